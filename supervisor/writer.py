"""Batches job writes from many concurrent handlers into few transactions.

A handler awaits its write: the await returns once the write is committed (True) or
dropped because the lease was lost (False). While one transaction commits the next
writes queue up, so batching grows with load and adds no delay when idle.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from . import metrics
from .store import JobWrite, Store

log = structlog.get_logger("supervisor.writer")


@dataclass
class _Pending:
    write: JobWrite
    done: asyncio.Future[bool]


class BatchWriter:
    def __init__(self, store: Store, *, max_batch: int = 500) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0
        self._flushed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batch-writer")

    async def write(self, job_write: JobWrite) -> bool:
        if self._task is None or self._task.done():
            raise RuntimeError("batch writer is not running")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # Mark a failure as seen even if the waiter was cancelled meanwhile.
        done.add_done_callback(lambda future: future.cancelled() or future.exception())
        self._queue.put_nowait(_Pending(job_write, done))
        # Shield: a handler cancelled while waiting must not cancel the batch for others.
        return await asyncio.shield(done)

    async def next_flush(self) -> None:
        """Wait until the next batch has been written (tests and tools watch state with it)."""
        await self._flushed.wait()

    async def close(self) -> None:
        """Apply everything queued so far, then stop."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        await self._task
        self._task = None

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            item = await self._queue.get()
            batch: list[_Pending] = []
            while True:
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                if stopping or len(batch) >= self._max_batch or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                await self._flush(batch)

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            applied = await self._store.apply([pending.write for pending in batch])
        except Exception as exc:  # the database is down or refused: every waiter learns it
            log.error("database write failed", error=str(exc), writes=len(batch))
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
            return
        self.transactions += 1
        metrics.DB_WRITE_BATCH.observe(len(batch))
        metrics.LEASES_LOST.inc(len(batch) - len(applied))
        for pending in batch:
            if not pending.done.done():
                pending.done.set_result(pending.write.job_id in applied)
        # Wake whoever waits for a flush; the next waiters get a fresh event.
        flushed, self._flushed = self._flushed, asyncio.Event()
        flushed.set()
