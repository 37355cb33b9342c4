"""The soak: does the daemon's memory stay flat? `python -m bench.soak [--quick] [--minutes N]`.

5,000 long-running jobs on the simulator (one result per 100 s, so none ends or breaches in
the run), tracked by a daemon polling every 5 s, for 30 minutes (`--quick`: 5). The resident
set of the daemon and of the simulator is sampled every 10 s from /proc; what is printed is
the least-squares slope (MB/min) and the growth between the end of the warm-up (minute 5; a
fifth of the run in quick mode, where minute 5 is the end) and the last sample, the daemon's
next to the bare simulator process's as a baseline: the simulator keeps every job and a
request log, so its slope is what "growing with the work" looks like on this machine.

`--trace` runs the daemon under tracemalloc (25 frames) and prints the allocation sites
that grew most between the warm-up's end and the end of the run: how a leak is found.
tracemalloc slows the daemon down and adds its own memory, so a traced run's RSS figures are
not the untraced ones; run without it for the figures.

Results go to bench/results/soak.json (soak-quick.json, soak-trace.json).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench import common

JOBS = 5000
JOB_KNOBS = {"rate": 0.01, "limit": 1000}  # one result per 100 s: active for hours, never breached
POLICIES = """
[policies.default]
max_runtime = "7d"
max_queued = "7d"
stall_timeout = "7d"
max_credits = 1000000000
warn_at = []
"""
SAMPLE_EVERY = 10.0
SNAPSHOT_EVERY = 60.0
TRACE_FRAMES = 25


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minute, MB): MB per minute."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def run(quick: bool = False, log: Any = print, minutes: float | None = None, trace: bool = False) -> dict[str, Any]:
    minutes = minutes if minutes is not None else (5.0 if quick else 30.0)
    warmup = min(5.0, minutes / 5)
    work = common.workdir("soak")
    fake = common.FakeApi(work)
    daemon = None
    samples: list[dict[str, float]] = []
    snapdir = work / "snapshots"
    try:
        ids = fake.bulk(JOBS, **JOB_KNOBS)
        ids_file = work / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        port = common.free_port()
        config = work / "supervisor.toml"
        config.write_text(
            common.config_text(
                fake.base_url,
                f"sqlite:///{work / 'soak.db'}",
                listen=f"127.0.0.1:{port}",
                supervisor={"poll_interval": '"5s"'},
                policies=POLICIES,
                api={"max_concurrency": "32", "timeout": '"10s"'},
            )
        )
        common.cli(["migrate"], cwd=work, config=config)
        daemon = _start(work, config, port, snapdir if trace else None)
        common.cli(["track", "--from-file", str(ids_file)], cwd=work, config=config)
        polls_at_start = fake.stats()["status"]
        started = time.monotonic()
        log(f"soak: {JOBS:,} jobs, poll 5 s, {minutes:g} min (warm-up {warmup:g} min){', traced' if trace else ''}")
        while (elapsed := time.monotonic() - started) < minutes * 60:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.proc.returncode}); see {daemon.log_path}")
            samples.append(
                {"minute": elapsed / 60, "daemon_mb": rss_mb(daemon.proc.pid), "simulator_mb": rss_mb(fake.proc.pid)}
            )
            if len(samples) % 6 == 1:
                s = samples[-1]
                log(f"  {s['minute']:5.1f} min  daemon {s['daemon_mb']:6.1f} MB  simulator {s['simulator_mb']:6.1f} MB")
            time.sleep(max(0.0, SAMPLE_EVERY * len(samples) - (time.monotonic() - started)))
        polls = fake.stats()["status"] - polls_at_start
        errors = daemon.errors()
    finally:
        if daemon is not None:
            daemon.stop()
        fake.close()
    steady = [s for s in samples if s["minute"] >= warmup]
    figures = {
        who: {
            "start_mb": steady[0][f"{who}_mb"],
            "end_mb": steady[-1][f"{who}_mb"],
            "growth_mb": steady[-1][f"{who}_mb"] - steady[0][f"{who}_mb"],
            "slope_mb_per_min": slope([(s["minute"], s[f"{who}_mb"]) for s in steady]),
        }
        for who in ("daemon", "simulator")
    }
    result: dict[str, Any] = {
        "machine": common.machine_info(),
        "jobs": JOBS,
        "poll_interval_s": 5,
        "minutes": minutes,
        "warmup_minutes": warmup,
        "traced": trace,
        "polls": polls,
        "error_lines": len(errors),
        "figures": figures,
        "samples": samples,
    }
    if trace:
        result["top_growth"] = _growth(snapdir, warmup)
    log(render(result))
    name = "soak-trace" if trace else ("soak-quick" if quick else "soak")
    log(f"results: {common.write_json(name + '.json', result)}")
    return result


def render(result: dict[str, Any]) -> str:
    rows = [
        (who, f["start_mb"], f["end_mb"], f["growth_mb"], f["slope_mb_per_min"]) for who, f in result["figures"].items()
    ]
    text = common.table(
        [
            f"process (minute {result['warmup_minutes']:g} → {result['minutes']:g})",
            "RSS start MB",
            "RSS end MB",
            "growth MB",
            "slope MB/min",
        ],
        rows,
    )
    text += f"\n{result['polls']:,} status polls in {result['minutes']:g} min; {result['error_lines']} error lines"
    for site in result.get("top_growth", []):
        text += f"\n  +{site['kib']:9.1f} KiB {site['count']:+7d} blocks  {site['where']}"
    return text


# -- the traced daemon ------------------------------------------------------------------------


def _start(work: Path, config: Path, port: int, snapdir: Path | None) -> common.Daemon:
    if snapdir is None:
        return common.Daemon(work, config, port)
    snapdir.mkdir()
    return _TracedDaemon(work, config, port, snapdir)


class _TracedDaemon(common.Daemon):
    """common.Daemon's process, started as `python -m bench.soak _traced SNAPDIR --config C run`."""

    def __init__(self, work: Path, config: Path, port: int, snapdir: Path) -> None:
        self.port = port
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self.admin_url = f"http://127.0.0.1:{port}"
        self.log_path = work / "daemon-traced.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [common.PY, "-m", "bench.soak", "_traced", str(snapdir), "--config", str(config), "run"],
            cwd=common.REPO,
            env=common.child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        common.wait_until(self._up, timeout=120, what="the traced daemon to start")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited ({self.proc.returncode}); see {self.log_path}")
        try:
            common.http_text(self.admin_url + "/healthz", timeout=2)
            return True
        except OSError:
            return False


def _growth(snapdir: Path, warmup: float) -> list[dict[str, Any]]:
    snaps = sorted(snapdir.glob("*.snap"))
    if len(snaps) < 2:
        return []
    first = next((p for p in snaps if int(p.stem) >= warmup * 60), snaps[0])
    before, after = tracemalloc.Snapshot.load(str(first)), tracemalloc.Snapshot.load(str(snaps[-1]))
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    ]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    top = []
    for stat in stats[:15]:
        frames = [f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}" for f in stat.traceback]
        top.append({"kib": stat.size_diff / 1024, "count": stat.count_diff, "where": " < ".join(frames[-1:-6:-1])})
    return top


def _traced_main(snapdir: Path, args: list[str]) -> None:
    """The CLI, with tracemalloc on and a snapshot written every minute (named by the
    second it was taken at), from a thread so the daemon's loop is not involved."""
    tracemalloc.start(TRACE_FRAMES)
    started = time.monotonic()

    def snapshots() -> None:
        while True:
            time.sleep(SNAPSHOT_EVERY)
            snap = tracemalloc.take_snapshot()
            path = snapdir / f"{int(time.monotonic() - started):06d}.snap"
            snap.dump(str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").replace(path)

    threading.Thread(target=snapshots, name="soak-snapshots", daemon=True).start()
    from supervisor.app.cli import main

    main(args, prog_name="clado-supervisor")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_traced"]:  # the daemon side of --trace
        _traced_main(Path(argv[1]), argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 minutes instead of 30")
    parser.add_argument("--minutes", type=float, help="the run's length (overrides --quick)")
    parser.add_argument("--trace", action="store_true", help="tracemalloc: print the sites that grew most")
    args = parser.parse_args(argv)
    run(quick=args.quick, minutes=args.minutes, trace=args.trace, log=lambda text: print(text, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
