"""`clado-supervisor demo`: the whole product in under a minute, with no API key and no setup.

It starts the Clado simulator on loopback and the real daemon (Daemon + Store + CladoClient over
HTTP) on a throwaway SQLite file, submits jobs through POST /api/search/deep_research whose
``fake:`` query tokens make them behave well, run away, stall, fail or get cancelled elsewhere,
shows what the supervisor does to each, and ends with a summary checked against the simulator's
own records (its bill and its count of cancel calls). Nothing is mocked, so a regression in the
daemon shows up here as a failed check and exit code 1, not as a pretty lie.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import structlog
from rich.console import Console, Group
from rich.live import Live
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from supervisor.adapters.logs import configure_logging
from supervisor.adapters.store import Store, utcnow
from supervisor.app.http import AdminApi, AdminServer
from supervisor.app.operations import Operations
from supervisor.app.top import STATE_STYLE
from supervisor.app.views import SubmitResult
from supervisor.config import Config, load_config
from supervisor.core.job import Job
from supervisor.core.policy import job_policy
from supervisor.core.states import TERMINAL, Reason, State
from supervisor.service.runtime import Daemon
from supervisor.service.wiring import client_for, open_store
from supervisor.sim.server import FakeClado, ThreadedFakeApi

log = structlog.get_logger("supervisor.demo")
USD_PER_CREDIT = 0.01  # the public price: 1 credit per result, $0.01 a credit
REFRESH_S = 0.25
TIMEOUT_S = 55.0  # at speed 1; the jobs are built to be final after about 30 s
POLICY_REASONS = frozenset({Reason.MAX_CREDITS, Reason.MAX_RUNTIME, Reason.MAX_QUEUED, Reason.STALL_TIMEOUT})
# Scenario knobs that are durations (divided by the speed); `rate` is multiplied by it.
_TIME_KNOBS = frozenset({"queue_for", "process_for", "fail_after", "external_cancel_after", "cancel_delay"})

# The policies' limits at speed 1 (see _config_text); team=growth jobs get the bulk policy.
DEFAULT_LIMITS = {"max_runtime": 25, "stall_timeout": 8, "max_credits": 60}
BULK_LIMITS = {"max_runtime": 40, "max_credits": 150}
GROWTH = {"team": "growth"}
RESEARCH = {"team": "research"}  # under a team budget that runs out mid-demo
SHADOW = {"team": "shadow"}  # under an observe-mode rule: recorded, never cancelled
RESEARCH_BUDGET = {"name": "research-daily", "credits": 90}
SHADOW_MAX_CREDITS = 20


@dataclass(frozen=True)
class DemoJob:
    kind: str
    query: str
    limit: int  # results asked for: what the job bills if it runs to the end
    knobs: Mapping[str, float | int | bool]
    expect_state: State
    expect_reason: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # Started by someone else's script and only tracked: nothing capped it at submit time.
    started_elsewhere: bool = False
    # Once it has completed, someone else holding the key asks it for this many more results
    # (the API's `continue`): the same job id runs and bills again.
    continued_by_someone: int = 0

    def scaled_query(self, speed: float) -> str:
        knobs = []
        for name, value in self.knobs.items():
            if isinstance(value, bool):
                text = str(value).lower()
            elif name in _TIME_KNOBS:
                text = f"{value / speed:.4g}"
            elif name == "rate":
                text = f"{value * speed:.4g}"
            else:
                text = str(value)
            knobs.append(f"{name}={text}")
        return f"{self.query} fake:{','.join(knobs)}"


# Times and rates at speed 1.
JOBS: tuple[DemoJob, ...] = (
    DemoJob("well-behaved", "founding engineers in Lisbon", 25,
            {"rate": 2.5, "process_for": 2}, State.COMPLETED),
    DemoJob("bulk export", "account executives in fintech", 120,
            {"rate": 10}, State.COMPLETED, labels=GROWTH),
    # Submitted through the supervisor with limit 500 under max_credits 60: the API is asked
    # for 60, so the job is capped at the source and needs no cancel.
    DemoJob("clamped submit", "every recruiter in Europe", 500,
            {"rate": 8}, State.COMPLETED),
    DemoJob("credit runaway", "every engineer in California", 500,
            {"rate": 8}, State.CANCELLED, Reason.MAX_CREDITS, started_elsewhere=True),
    DemoJob("runtime runaway", "rare COBOL experts", 300,
            {"rate": 1}, State.CANCELLED, Reason.MAX_RUNTIME),
    DemoJob("stalled", "quantum sommeliers", 40,
            {"rate": 2, "stall_after": 8}, State.CANCELLED, Reason.STALL_TIMEOUT),
    DemoJob("slow to cancel", "sales leads in retail", 600,
            {"rate": 10, "cancel_delay": 3}, State.CANCELLED, Reason.MAX_CREDITS, GROWTH, started_elsewhere=True),
    DemoJob("fails", "designers who code", 30,
            {"rate": 1, "fail_after": 6}, State.FAILED),
    # Completes at 20, then someone continues it for 200 more: the supervisor sees it running
    # again at its next re-check, reopens it and cancels it at its limit.
    DemoJob("continued elsewhere", "growth marketers in Madrid", 20,
            {"rate": 10}, State.CANCELLED, Reason.MAX_CREDITS, started_elsewhere=True, continued_by_someone=200),
    DemoJob("external cancel", "nurses in Ohio", 50,
            {"rate": 2, "external_cancel_after": 7}, State.CANCELLED, Reason.EXTERNAL),
    # It reaches the credit limit moments before finishing on its own: the cancel arrives too
    # late (409, "already completed"), which the supervisor must record as completed.
    DemoJob("finishes first", "data engineers in Austin", 80,
            {"rate": 6, "race": True}, State.COMPLETED, Reason.MAX_CREDITS, started_elsewhere=True),
    # Each is within its own limits; together they exhaust the team's daily budget.
    DemoJob("team budget", "ML researchers in Zurich", 300,
            {"rate": 4}, State.CANCELLED, f"budget:{RESEARCH_BUDGET['name']}", RESEARCH),
    DemoJob("team budget", "robotics PhDs in Boston", 300,
            {"rate": 4}, State.CANCELLED, f"budget:{RESEARCH_BUDGET['name']}", RESEARCH),
    # A rule being tried out: it would cancel at 20 credits, but only records that.
    DemoJob("observe rule", "recruiters in Berlin", 45,
            {"rate": 3}, State.COMPLETED, None, SHADOW),
)  # fmt: skip

LIVE_COLUMNS = ("job", "kind", "policy", "state", "remote", "credits/max", "elapsed", "reason")
FINAL_COLUMNS = ("job", "kind", "policy", "state", "reason", "credits/max", "elapsed",
                 "confirmed", "left alone")  # fmt: skip
NUMERIC_COLUMNS = frozenset({"credits/max", "elapsed", "left alone"})
# Left out below WIDE_TERMINAL columns, so that each job stays on one line of an 80-column terminal.
NARROW_OMITS = frozenset({"job", "policy", "remote"})
WIDE_TERMINAL = 100


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
        fake = FakeClado()
        # log_config=None: uvicorn's loggers propagate to the root logger (the log file).
        with ThreadedFakeApi(fake, log_config=None) as api:
            config = load_config(_write_config(Path(workdir), api.base_url, speed))
            _print_header(console, config, speed)
            tour = Tour(console, config, fake, speed)
            await tour.run()
    return _print_summary(console, tour, log_path)


def _stop_logging_to(stream: TextIO) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
            root.removeHandler(handler)


# --------------------------------------------------------------------------------------------
# Setup


def _write_config(workdir: Path, base_url: str, speed: float) -> Path:
    """A real supervisor.toml, so the daemon loads, validates and hashes it as in production.

    The API key is the demo's own, in a file: a real CLADO_API_KEY in the environment is never
    read, let alone sent anywhere."""
    key_file = workdir / "api-key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"lk_demo_{os.urandom(12).hex()}\n")
    path = workdir / "supervisor.toml"
    path.write_text(_config_text(base_url, key_file, workdir / "supervisor.db", speed), encoding="utf-8")
    return path


def _config_text(base_url: str, key_file: Path, db_file: Path, speed: float) -> str:
    def duration(seconds: float) -> str:
        return json.dumps(f"{seconds / speed:.3f}s")

    def string(value: object) -> str:
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string

    return f"""\
# Written by `clado-supervisor demo` (speed {speed:g}): the durations that shape the jobs'
# lives are divided by the speed.
[api]
base_url = {string(base_url)}
api_key_file = {string(key_file)}
timeout = "5s"

[database]
url = {string(f"sqlite:///{db_file}")}

[supervisor]
poll_interval = {duration(2)}
# Not scaled: the tick only claims jobs, each is then handled at its own due time.
tick_interval = "200ms"
confirm_interval = {duration(0.3)}
confirm_timeout = {duration(20)}
shutdown_timeout = "5s"

[policies.default]
max_runtime = {duration(DEFAULT_LIMITS["max_runtime"])}
stall_timeout = {duration(DEFAULT_LIMITS["stall_timeout"])}
max_credits = {DEFAULT_LIMITS["max_credits"]}
warn_at = [0.8]

[policies.bulk]
match = {{ team = "growth" }}
max_runtime = {duration(BULK_LIMITS["max_runtime"])}
max_credits = {BULK_LIMITS["max_credits"]}

[policies.research]
match = {{ team = "research" }}
max_runtime = {duration(BULK_LIMITS["max_runtime"])}
max_credits = 400

# A rule under trial: it decides and records "would cancel", and never cancels.
[policies.shadow]
match = {{ team = "shadow" }}
max_credits = {SHADOW_MAX_CREDITS}
action = "observe"

[budgets.{RESEARCH_BUDGET["name"]}]
match = {{ team = "research" }}
period = "day"
credits = {RESEARCH_BUDGET["credits"]}
warn_at = [0.5]
action = "cancel"
"""


def _print_header(console: Console, config: Config, speed: float) -> None:
    console.print(Rule("clado-supervisor demo"))
    console.print("The real daemon on a local Clado simulator: no API key, nothing billed.")
    if speed != 1:
        console.print(f"Speed x{speed:g}: every time, rate and limit duration is scaled.")
    console.print(f"  simulator  {config.api.base_url}")
    console.print(f"  database   {config.database.url} (temporary)")
    elsewhere = sum(job.started_elsewhere for job in JOBS)
    console.print(f"  jobs       {len(JOBS) - elsewhere} submitted via POST /api/search/deep_research, {elsewhere} "
                  "started elsewhere and tracked;")  # fmt: skip
    console.print("             a fake: token in each query tells the simulator how that job behaves")
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


# --------------------------------------------------------------------------------------------
# The tour


class Tour:
    """Submits the jobs, runs the daemon until every job is final, and keeps what it saw."""

    def __init__(self, console: Console, config: Config, fake: FakeClado, speed: float) -> None:
        self.console = console
        self.config = config
        self.fake = fake
        self.speed = speed
        self.kinds: dict[str, DemoJob] = {}  # job id → what it was built to do
        self.rows: list[Job] = []
        self.sim: dict[str, dict[str, Any]] = {}  # job id → the simulator's view of it
        self.started = utcnow()
        self.finished = self.started
        self._seen_event = 0
        self._continued: set[str] = set()  # jobs someone else has continued
        self._seen_update: dict[str, datetime] = {}

    @property
    def all_final(self) -> bool:
        waiting = [
            job_id for job_id, kind in self.kinds.items() if kind.continued_by_someone and job_id not in self._continued
        ]
        return not waiting and len(self.rows) == len(self.kinds) and all(row.state in TERMINAL for row in self.rows)

    def _continue_completed(self) -> None:
        """Someone else's `continue` on the jobs built for it, once the supervisor saw them complete."""
        for row in self.rows:
            kind = self.kinds.get(row.job_id)
            if (
                kind
                and kind.continued_by_someone
                and row.state is State.COMPLETED
                and row.job_id not in self._continued
            ):
                self._continued.add(row.job_id)
                self.fake.continue_job(row.job_id, kind.continued_by_someone)

    async def run(self) -> None:
        store = await open_store(self.config)
        client = client_for(self.config)
        daemon = Daemon(self.config, store, client)
        daemon.start()
        # The web console beside it, on a free loopback port, with a token for this run only.
        token = secrets.token_hex(16)  # hex: it can never look like an API key (lk_…)
        console = AdminServer(AdminApi(daemon, token, self.config.http.max_body_bytes), "127.0.0.1:0")
        await console.start()
        self.console.print(f"  console    http://127.0.0.1:{console.port}/ui  (admin token {token}, this run only)")
        try:
            await self._submit(Operations(self.config, store, client, daemon.effects))
            await self._watch(store)
        finally:
            await console.stop()
            await daemon.stop()
            await client.aclose()
            await store.close()
            self.finished = utcnow()
        self.sim = {job_id: self.fake.job_info(job_id) for job_id in self.kinds}

    async def _submit(self, ops: Operations) -> None:
        """Through the same calls as `clado-supervisor submit` (admission, the API, then the
        jobs table) and, for jobs started elsewhere, `clado-supervisor track`."""
        for job in JOBS:
            labels = {"scenario": job.kind.replace(" ", "-"), **job.labels}
            if job.started_elsewhere:
                job_id = self.fake.create_job(job.scaled_query(self.speed), job.limit)
                await ops.track([job_id], labels=labels)
            else:
                started = await ops.submit(job.scaled_query(self.speed), limit=job.limit, labels=labels, queue=False)
                assert isinstance(started, SubmitResult)  # noqa: S101 - refused, never queued (queue=False)
                job_id = started.job_id
            self.kinds[job_id] = job

    async def _watch(self, store: Store) -> None:
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S / self.speed
        live = Live(console=self.console, refresh_per_second=4, transient=True)
        if self.console.is_terminal:  # elsewhere (a pipe, CI) the event lines are the progress
            live.start()
        try:
            while True:
                self.rows = await store.list_jobs()
                self._continue_completed()
                await self._print_new_events(store)
                if live.is_started:
                    live.update(self._live_view())
                if self.all_final or asyncio.get_running_loop().time() > deadline:
                    return
                await asyncio.sleep(REFRESH_S)
        finally:
            live.stop()

    async def _print_new_events(self, store: Store) -> None:
        """What the daemon recorded since the last look, one line an event."""
        events = []
        for row in self.rows:
            if self._seen_update.get(row.job_id) != row.updated_at:
                self._seen_update[row.job_id] = row.updated_at
                events += [e for e in await store.events(row.job_id) if e["id"] > self._seen_event]
        for event in sorted(events, key=lambda e: e["id"]):
            self.console.print(self._event_line(event))
        self._seen_event = max([self._seen_event, *(e["id"] for e in events)])

    def _event_line(self, event: dict[str, Any]) -> Text:
        at = (event["at"] - self.started).total_seconds()
        line = Text(f"{at:+6.1f}s  {event['job_id'][:8]}  {self.kinds[event['job_id']].kind:<20}")
        if event["kind"] == "transition":
            target = State(event["to_state"])
            line.append(f"{event['from_state'] or 'new'} → ")
            line.append(target.value, style=STATE_STYLE[target])
            line.append("  ")
        line.append(describe_event(event), style="dim" if event["kind"] == "tracked" else "")
        return line

    def _live_view(self) -> Group:
        seconds = (utcnow() - self.started).total_seconds()
        final = sum(row.state in TERMINAL for row in self.rows)
        billed = self.fake.stats()["credits_charged"]
        status = Text(
            f"{seconds:5.1f}s · {final}/{len(self.kinds)} jobs final · "
            f"the simulator has billed {billed} credits so far",
            style="dim",
        )
        return Group(self.table(live=True), status)

    def table(self, *, live: bool) -> Table:
        """The jobs as the supervisor sees them; the final table adds the simulator's view."""
        columns: tuple[str, ...] = LIVE_COLUMNS if live else FINAL_COLUMNS
        if self.console.width < WIDE_TERMINAL:
            columns = tuple(column for column in columns if column not in NARROW_OMITS)
        table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
        for column in columns:
            table.add_column(column, justify="right" if column in NUMERIC_COLUMNS else "left")
        by_id = {row.job_id: row for row in self.rows}
        for job_id, kind in self.kinds.items():
            if job_id in by_id:
                cells = self._cells(by_id[job_id], kind, live=live)
                table.add_row(*(cells[column] for column in columns))
        return table

    def _cells(self, row: Job, kind: DemoJob, *, live: bool) -> dict[str, Text | str]:
        state = State(row.state)
        limit = job_policy(self.config, row).max_credits
        credits = Text(f"{row.credits_used}/{limit}")
        if limit is not None and row.credits_used >= limit:
            credits.stylize("bold red")
        end = row.confirmed_at or row.updated_at if state in TERMINAL else utcnow()
        reason = row.cancel_reason or ""
        if not reason and row.would_cancel_reason:
            reason = f"(would cancel) {row.would_cancel_reason}"
        elif live and not reason and row.warned:
            reason = "warned: " + ", ".join(_warning_name(key) for key in row.warned)
        cells: dict[str, Text | str] = {
            "job": row.job_id[:8],
            "kind": kind.kind,
            "policy": row.policy,
            "state": Text(state.value, style=STATE_STYLE[state]),
            "remote": row.remote_status or "-",
            "credits/max": credits,
            "elapsed": f"{(end - row.submitted_at).total_seconds():.1f}s",
            "reason": reason,
        }
        if not live:
            cells["confirmed"] = "yes" if row.confirmed_at else Text("no", style="bold red")
            # What a runaway would have billed had nobody stopped it (a column of the summary).
            cells["left alone"] = str(left_alone_cost(self.sim[row.job_id])) if is_runaway(row) else ""
        return cells


def _warning_name(key: str) -> str:
    """ "max_runtime@0.8" → "80% of max_runtime"."""
    limit, _, fraction = key.partition("@")
    return f"{float(fraction):.0%} of {limit}" if fraction else key


def describe_event(event: Mapping[str, Any]) -> str:
    """One event row in words, for the progress lines."""
    kind: str = event["kind"]
    detail = event["detail"] or {}
    if kind == "tracked":
        if detail.get("source") == "track":
            return f"tracked (started elsewhere), policy {detail.get('policy')}"
        if "requested_limit" in detail:
            return (f"submitted, policy {detail.get('policy')}: asked the API for {detail['limit']} of "
                    f"{detail['requested_limit']} results, all its max_credits allows")  # fmt: skip
        return f"submitted, policy {detail.get('policy')}"
    if kind == "reopened":
        return (f"reopened: running again after it was {detail.get('was')} (someone continued it); "
                f"its limits apply to its whole total, {detail.get('credits')} credits so far")  # fmt: skip
    if kind == "warning":
        return f"warning: {detail['fraction']:.0%} of {event['reason']} ({_measure(detail)})"
    if kind in ("poll_error", "cancel_error"):
        return f"{kind.replace('_', ' ')}: {detail.get('error')}"
    if kind == "would_cancel":
        return f"would cancel for {event['reason']} ({_measure(detail)}): observe mode, recorded only"
    if kind != "transition":
        return kind
    target = State(event["to_state"])
    if target is State.CANCELLING:
        return f"{event['reason']}: {_measure(detail)}; decision recorded"
    if target is State.CONFIRMING:
        return f"cancel sent: {detail.get('cancel')}; polling until final"
    if "remote_status" in detail:
        after = detail.get("credits_after_decision")
        billed = f", {after} of them after the decision" if after else ""
        who = " by someone else" if event["reason"] == Reason.EXTERNAL else ""
        return f"status poll confirms {detail['remote_status']}{who} at {detail['credits']} credits{billed}"
    return json.dumps(detail)


def _measure(detail: Mapping[str, Any]) -> str:
    if "spent" in detail:  # a budget's decision
        return f"the team has spent {detail['spent']} of {detail['budget_credits']} credits today"
    value, threshold = detail["value"], detail["threshold"]
    if detail["limit"] == Reason.MAX_CREDITS:
        return f"{value:g} credits, limit {threshold:g}"
    if detail["limit"] == Reason.STALL_TIMEOUT:
        return f"no new results for {value:.2f}s, limit {threshold:.2f}s"
    return f"running for {value:.2f}s, limit {threshold:.2f}s"


# --------------------------------------------------------------------------------------------
# The summary


def _print_summary(console: Console, tour: Tour, log_path: Path) -> int:
    seconds = (tour.finished - tour.started).total_seconds()
    console.print(Rule(f"summary after {seconds:.1f}s"))
    console.print(tour.table(live=False))
    console.print()
    for line in outcome_lines(tour):
        console.print(line)
    problems = find_problems(tour)
    for problem in problems:
        console.print(Text(f"✗ {problem}", style="bold red"))
    if not problems:
        console.print(Text("✓ Every job ended as it was built to, as the simulator's records confirm.", style="green"))
    console.print(
        f"The daemon's log (JSON lines) is kept at {log_path}; the temporary database and config were deleted."
    )
    return 1 if problems else 0


def stopped_by_rule(reason: str | None) -> bool:
    """A reason the supervisor itself cancels for: a policy limit or a budget."""
    return reason in POLICY_REASONS or (reason or "").startswith("budget:")


def is_runaway(row: Job) -> bool:
    """Stopped by the supervisor for breaking a limit (a lost race is not a stop)."""
    return row.state == State.CANCELLED and stopped_by_rule(row.cancel_reason)


def left_alone_cost(sim_job: Mapping[str, Any]) -> int:
    """What the simulator would have billed had nobody cancelled: its result limit, or where it
    stalls for good (a stalled job costs nothing more; stopping it frees the slot)."""
    stall_after = sim_job["scenario"]["stall_after"]
    limit: int = sim_job["limit"]
    return limit if stall_after is None else min(limit, stall_after)


def outcome_lines(tour: Tour) -> list[str]:
    """The run in four sentences, every number taken from the jobs table or the simulator."""
    rows = [row for row in tour.rows if row.job_id in tour.kinds]
    runaways = [row for row in rows if is_runaway(row)]
    reasons = Counter(row.cancel_reason for row in runaways)
    calls = Counter(tour.sim[row.job_id]["cancel_calls"] for row in runaways)
    others = Counter(_plain_outcome(row) for row in rows if not is_runaway(row))
    spent = sum(row.credits_used for row in runaways)
    alone = sum(left_alone_cost(tour.sim[row.job_id]) for row in runaways)
    saved = alone - spent
    confirmed = sum(row.confirmed_at is not None for row in rows)
    matching = sum(row.credits_used == tour.sim[row.job_id]["results"] for row in rows)
    by_reason = ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items()))
    by_calls = "one cancel call each" if set(calls) == {1} else f"cancel calls per job: {dict(calls)}"
    every = "Every final state" if confirmed == len(tour.kinds) else "Final states"
    return [
        f"{len(runaways)} runaways cancelled ({by_reason}), {by_calls}.",
        f"The others: {', '.join(f'{n} {what}' for what, n in others.items())}.",
        (
            f"{every} confirmed by a status poll: {confirmed} of {len(tour.kinds)} jobs; the supervisor's "
            f"credit count matches the simulator's bill for {matching} of {len(tour.kinds)}."
        ),
        (
            f"The runaways spent {spent:,} credits; left alone they would have billed {alone:,}: "
            f"saved {saved:,} credits (${saved * USD_PER_CREDIT:,.2f} at ${USD_PER_CREDIT}/credit)."
        ),
        *_capped_lines(tour, rows),
        *_observe_lines(rows),
    ]


def _capped_lines(tour: Tour, rows: list[Job]) -> list[str]:
    """Submissions the API was asked for less than requested: capped at the source."""
    capped = [row for row in rows if row.result_limit is not None and row.result_limit < tour.kinds[row.job_id].limit]
    if not capped:
        return []
    asked = sum(row.result_limit or 0 for row in capped)
    requested = sum(tour.kinds[row.job_id].limit for row in capped)
    line = (
        f"{len(capped)} submission(s) capped at the source: the API was asked for {asked:,} of the "
        f"{requested:,} results requested (what max_credits allows), so no cancel was needed."
    )
    return [line]


def _observe_lines(rows: list[Job]) -> list[str]:
    """What the observe-mode rule would have done, had it been switched on."""
    observed = [row for row in rows if row.would_cancel_credits is not None and row.state in TERMINAL]
    if not observed:
        return []
    would_save = sum(row.credits_used - (row.would_cancel_credits or 0) for row in observed)
    return [
        (
            f"The observe-mode rule (policies.shadow, max_credits {SHADOW_MAX_CREDITS}) would have cancelled "
            f"{len(observed)} job(s); it only recorded that, and switched on it would have saved "
            f"{would_save:,} more credits."
        )
    ]


def _plain_outcome(row: Job) -> str:
    state, reason = row.state, row.cancel_reason
    if state == State.COMPLETED and reason:
        return f"completed before the {reason} cancel landed (409; the breach is recorded)"
    if state == State.COMPLETED:
        return "completed within the limits"
    if state == State.CANCELLED and reason == Reason.EXTERNAL:
        return "cancelled by someone else (external)"
    if state == State.FAILED:
        return "failed (remote error)"
    return state + (f" ({reason})" if reason else "")


def find_problems(tour: Tour) -> list[str]:
    """Every way the run differs from what the jobs were built to show, checked against the
    simulator's records: its bill and its count of cancel calls."""
    problems = []
    rows = {row.job_id: row for row in tour.rows}
    for job_id, kind in tour.kinds.items():
        row, sim = rows.get(job_id), tour.sim[job_id]
        name = f"{job_id[:8]} ({kind.kind})"
        if row is None:
            problems.append(f"{name}: not in the jobs table")
            continue
        if row.state not in TERMINAL:
            problems.append(f"{name}: still {row.state} after {TIMEOUT_S / tour.speed:.0f}s")
            continue
        if (row.state, row.cancel_reason) != (kind.expect_state, kind.expect_reason):
            problems.append(
                f"{name}: ended {row.state} (reason {row.cancel_reason}), "
                f"expected {kind.expect_state} (reason {kind.expect_reason})"
            )
        if row.confirmed_at is None or row.final_status != sim["status"]:
            problems.append(f"{name}: final state not confirmed (remote status {sim['status']})")
        if row.credits_used != sim["results"]:
            problems.append(
                f"{name}: the supervisor counted {row.credits_used} credits, the simulator billed {sim['results']}"
            )
        expected_calls = 1 if stopped_by_rule(row.cancel_reason) else 0
        if sim["cancel_calls"] != expected_calls:
            problems.append(f"{name}: {sim['cancel_calls']} cancel calls, expected {expected_calls}")
    return problems
