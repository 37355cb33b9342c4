"""Keeping what was paid for: every job the supervisor cancelled, on a policy with
`keep_results = "DIR"`, has its results (partial ones are billed too) written to
DIR/<job_id>.jsonl once its state is final.

Off the enforcement path: its own scheduled run (never inside a tick, a poll or a cancel),
one job at a time, so it holds at most one of the client's request slots and polls and
cancels never wait behind it; the file work runs in a thread. The leader alone runs it, so
one process writes each file. Crash-safe: a job is recorded as kept (`kept_results`, with a
`results_kept` event) only after its file is complete and fsynced, and a file found half
written is continued where it ends, so a restarted daemon writes exactly the ones not yet
written. A failure (the API, the directory) is logged with the file and the problem, never a
result, and that job is tried again after a growing pause.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from datetime import datetime

import structlog

from supervisor.adapters.clado import CladoClient
from supervisor.adapters.results import ResultsFile, Saved, save_results
from supervisor.adapters.store import Store, db_error_text
from supervisor.config import Config
from supervisor.core.backoff import delay
from supervisor.core.job import Job
from supervisor.service.elector import Elector

log = structlog.get_logger("supervisor.results")

# How often the leader looks for cancelled jobs whose results are due, and how many it takes
# in one run (the next run takes the rest).
KEEP_EVERY = 5.0
KEEP_BATCH = 20
# One job's export (10 pages at most for the 1,000 results a job can reach) is bounded.
EXPORT_TIMEOUT = 120.0
# After a failure the job waits 30 s, doubling up to 30 min, before it is tried again.
RETRY_FIRST = 30.0
RETRY_CAP = 1800.0


class ResultsKeeper:
    def __init__(
        self,
        config: Callable[[], Config],
        store: Store,
        client: CladoClient,
        elector: Elector,
        clock: Callable[[], datetime],
        stopping: asyncio.Event,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._store = store
        self._client = client
        self._elector = elector
        self._clock = clock
        self._stopping = stopping
        self._monotonic = monotonic
        # job id -> (failures in a row, when it may be tried again): this process's memory
        # only; a restart tries every job at once, which is what a restart is for.
        self._failures: dict[str, tuple[int, float]] = {}

    def _running(self) -> bool:
        return not self._stopping.is_set() and self._elector.is_leader

    async def keep(self) -> None:
        """Write the results of the cancelled jobs that are final and not written yet."""
        if not self._running():
            return
        config = self._config()
        keeping = {name for name in config.policies if config.resolve_policy(name).keep_results is not None}
        if not keeping:
            return
        # A job on a policy the config no longer has is on `default`'s limits (resolve_policy).
        others = "default" in keeping
        now = self._monotonic()
        waiting = [job_id for job_id, (_, again_at) in self._failures.items() if now < again_at]
        try:
            due = await self._store.results_to_keep(
                set(config.policies) - keeping if others else keeping, others=others, limit=KEEP_BATCH, excluded=waiting
            )
        except Exception as exc:  # noqa: BLE001 - a chore never dies: the next run tries again
            log.warning("could not read the jobs whose results are due", error=db_error_text(exc))
            return
        for job in due:
            if not self._running():
                return
            await self._keep(config, job)

    async def _keep(self, config: Config, job: Job) -> None:
        directory = config.resolve_policy(job.policy).keep_results
        if directory is None:
            return
        path = os.path.join(directory, f"{job.job_id}.jsonl")
        try:
            await asyncio.to_thread(os.makedirs, directory, 0o700, True)
            saved = await self._export(job.job_id, path)
            if saved is None:  # the daemon is stopping: the next start continues the file
                return
            if not saved.complete:  # the page bound: the next run continues the file
                log.info("results partly kept; continuing at the next run", job_id=job.job_id, path=path)
                return
            recorded = await self._store.results_kept(job.job_id, self._clock(), path, saved.total)
        except Exception as exc:  # noqa: BLE001 - the API, the directory, the database: tried again later
            self._failed(job.job_id, path, exc)
            return
        self._failures.pop(job.job_id, None)
        if recorded:
            log.info("results kept", job_id=job.job_id, path=path, results=saved.total)

    async def _export(self, job_id: str, path: str) -> Saved | None:
        """The job's results into `path`, within EXPORT_TIMEOUT; None when the daemon began
        stopping meanwhile (shutdown does not wait for an export: it is resumable)."""
        export = asyncio.ensure_future(save_results(self._client, job_id, ResultsFile("jsonl", path=path)))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({export, stopping}, timeout=EXPORT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not export.done():
                export.cancel()
                await asyncio.gather(export, return_exceptions=True)
        if export.cancelled():
            if self._stopping.is_set():
                return None
            raise TimeoutError
        return export.result()

    def _failed(self, job_id: str, path: str, exc: BaseException) -> None:
        count = self._failures.get(job_id, (0, 0.0))[0] + 1
        pause = delay(count, RETRY_FIRST, RETRY_CAP)
        self._failures[job_id] = (count, self._monotonic() + pause)
        problem = db_error_text(exc) if not isinstance(exc, TimeoutError) else f"took over {EXPORT_TIMEOUT:g}s"
        log.warning("could not keep results", job_id=job_id, path=path, error=problem, retry_in=round(pause))
