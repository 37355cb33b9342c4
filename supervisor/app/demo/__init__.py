"""`clado-supervisor demo`: the whole product in under a minute, with no API key and no setup.

It starts the Clado simulator on loopback and the real daemon (Daemon + Store + CladoClient over
HTTP) on a throwaway SQLite file, submits jobs through POST /api/search/deep_research whose
``fake:`` query tokens make them behave well, run away, stall, fail or get cancelled elsewhere,
queues one behind a spent hourly budget until the hour turns, shows what the supervisor does
to each, and ends with a summary checked against the simulator's own records (its bill and its
count of cancel calls). Nothing is mocked, so a regression in the daemon shows up here as a
failed check and exit code 1, not as a pretty lie.

scenes.py is the script (the jobs, the config, the clock), tour.py runs it, queue_scene.py is
the queued submission, view.py draws the progress and the tables, summary.py the ending.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import structlog
from rich.console import Console
from rich.rule import Rule

from supervisor.adapters.logs import configure_logging
from supervisor.app.demo.scenes import HOUR_TURNS_AT_S, JOBS, DemoClock, write_config
from supervisor.app.demo.summary import print_summary
from supervisor.app.demo.tour import Tour
from supervisor.config import Config, load_config
from supervisor.sim.server import FakeClado, ThreadedFakeApi

__all__ = ["run_demo"]

log = structlog.get_logger("supervisor.demo")


def run_demo(speed: float = 1.0) -> int:
    """Run the tour; the exit code is 0 when every job ended as the summary says it should."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 120  # a log or a pipe has no width; 80 would fold the tables
    # The log file outlives the temporary directory, so the path the summary prints stays valid.
    fd, log_name = tempfile.mkstemp(prefix="clado-supervisor-demo-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(fd, "w", encoding="utf-8") as log_stream:
        # JSON lines to the file only: the daemon's logs must not garble the live table.
        configure_logging("json", "info", stream=log_stream)
        try:
            return asyncio.run(_demo(console, speed, log_path))
        except KeyboardInterrupt:
            console.print(f"demo interrupted; the temporary database and config were removed (log: {log_path})")
            return 130
        except Exception as exc:  # one line for the user, the traceback for whoever debugs it
            log.exception("demo failed")
            print(f"clado-supervisor: error: demo failed: {exc} (traceback in {log_path})", file=sys.stderr)  # noqa: T201 - the CLI's one line
            return 1
        finally:
            _stop_logging_to(log_stream)


async def _demo(console: Console, speed: float, log_path: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="clado-supervisor-demo-") as workdir:
        # One clock for the daemon, its operations and the simulator, so the hour turns for all.
        clock = DemoClock(turn_after=HOUR_TURNS_AT_S / speed)
        fake = FakeClado(clock=clock.epoch)
        # log_config=None: uvicorn's loggers propagate to the root logger (the log file).
        with ThreadedFakeApi(fake, log_config=None) as api:
            config = load_config(write_config(Path(workdir), api.base_url, speed))
            _print_header(console, config, speed, clock)
            tour = Tour(console, config, fake, speed, clock)
            await tour.run()
    return print_summary(console, tour, log_path)


def _stop_logging_to(stream: TextIO) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
            root.removeHandler(handler)


def _print_header(console: Console, config: Config, speed: float, clock: DemoClock) -> None:
    console.print(Rule("clado-supervisor demo"))
    console.print("The real daemon on a local Clado simulator: no API key, nothing billed.")
    if speed != 1:
        console.print(f"Speed x{speed:g}: every time, rate and limit duration is scaled.")
    console.print(f"  simulator  {config.api.base_url}")
    console.print(f"  database   {config.database.url} (temporary)")
    elsewhere = sum(job.started_elsewhere for job in JOBS)
    console.print(f"  jobs       {len(JOBS) - elsewhere} submitted via POST /api/search/deep_research, {elsewhere} "
                  "started elsewhere and tracked, 1 queued behind a spent budget;")  # fmt: skip
    console.print("             a fake: token in each query tells the simulator how that job behaves")
    console.print(f"  clock      set to turn the hour ({clock.hour_turns_at:%H:%M} UTC) {HOUR_TURNS_AT_S / speed:g}s "
                  "into the run, for the hourly budget")  # fmt: skip
    for name in config.policies:
        policy = config.resolve_policy(name)
        match = config.policies[name].match
        who = f" ({', '.join(f'{k}={v}' for k, v in match.items())})" if match else ""
        limits = [f"{policy.max_credits} credits"]
        if policy.max_runtime:
            limits.append(f"{policy.max_runtime.total_seconds():g}s runtime")
        if policy.stall_timeout:
            limits.append(f"{policy.stall_timeout.total_seconds():g}s stall")
        console.print(f"  policy     {name}{who}: max {', '.join(limits)}")
    console.print()
