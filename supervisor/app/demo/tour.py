"""The tour: the real daemon on the simulator, the jobs submitted or tracked through the
same operations as the CLI, watched until every one is final."""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from supervisor.adapters.store import Store
from supervisor.app.demo.queue_scene import QueueScene
from supervisor.app.demo.scenes import JOBS, DemoClock, DemoJob
from supervisor.app.demo.view import event_line, jobs_table
from supervisor.app.http import AdminApi, AdminServer
from supervisor.app.operations import Operations
from supervisor.app.views import SubmitResult
from supervisor.config import Config
from supervisor.core.job import Job
from supervisor.core.states import TERMINAL, State
from supervisor.service.runtime import Daemon
from supervisor.service.wiring import client_for, open_store
from supervisor.sim.server import FakeClado

REFRESH_S = 0.25
TIMEOUT_S = 55.0  # at speed 1; the jobs are built to be final after about 30 s


class Tour:
    """Submits the jobs, runs the daemon until every job is final, and keeps what it saw."""

    def __init__(self, console: Console, config: Config, fake: FakeClado, speed: float, clock: DemoClock) -> None:
        self.console = console
        self.config = config
        self.fake = fake
        self.speed = speed
        self.clock = clock
        self.kinds: dict[str, DemoJob] = {}  # job id → what it was built to do
        self.rows: list[Job] = []
        self.sim: dict[str, dict[str, Any]] = {}  # job id → the simulator's view of it
        self.queue_scene = QueueScene(clock)
        self.started = clock.now()
        self.finished = self.started
        self._seen_event: dict[str, int] = {}  # job id → the last of its events printed
        self._continued: set[str] = set()  # jobs someone else has continued
        self._seen_update: dict[str, datetime] = {}

    @property
    def all_final(self) -> bool:
        waiting = [
            job_id for job_id, kind in self.kinds.items() if kind.continued_by_someone and job_id not in self._continued
        ]
        every_row = len(self.rows) == len(self.kinds) and all(row.state in TERMINAL for row in self.rows)
        return not waiting and every_row and self.queue_scene.done

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
        daemon = Daemon(self.config, store, client, clock=self.clock.now)
        daemon.start()
        # The web console beside it, on a free loopback port, with a token for this run only.
        token = secrets.token_hex(16)  # hex: it can never look like an API key (lk_…)
        console = AdminServer(AdminApi(daemon, token, self.config.http.max_body_bytes), "127.0.0.1:0")
        await console.start()
        self.console.print(f"  console    http://127.0.0.1:{console.port}/ui  (admin token {token}, this run only)")
        try:
            ops = Operations(self.config, store, client, daemon.effects, clock=self.clock.now)
            await self._submit(ops)
            await self._watch(ops)
        finally:
            await console.stop()
            await daemon.stop()
            await client.aclose()
            await store.close()
            self.finished = self.clock.now()
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

    async def _watch(self, ops: Operations) -> None:
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S / self.speed
        live = Live(console=self.console, refresh_per_second=4, transient=True)
        if self.console.is_terminal:  # elsewhere (a pipe, CI) the event lines are the progress
            live.start()
        try:
            while True:
                self.rows = await ops.store.list_jobs()
                self._continue_completed()
                await self._print_new_events(ops.store)
                for line in await self.queue_scene.step(self, ops):
                    self.console.print(line)
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
            if row.job_id in self.kinds and self._seen_update.get(row.job_id) != row.updated_at:
                self._seen_update[row.job_id] = row.updated_at
                seen = self._seen_event.get(row.job_id, 0)
                events += [e for e in await store.events(row.job_id) if e["id"] > seen]
        for event in sorted(events, key=lambda e: e["id"]):
            self.console.print(event_line(self, event))
            self._seen_event[event["job_id"]] = event["id"]

    def _live_view(self) -> Group:
        seconds = (self.clock.now() - self.started).total_seconds()
        final = sum(row.state in TERMINAL for row in self.rows)
        billed = self.fake.stats()["credits_charged"]
        status = Text(
            f"{seconds:5.1f}s · {final}/{len(self.kinds)} jobs final · "
            f"the simulator has billed {billed} credits so far",
            style="dim",
        )
        return Group(jobs_table(self, live=True), status)
