"""Batches job writes from many concurrent handlers into few transactions.

A handler awaits its write: the await returns once the write is committed (True) or
dropped because the lease was lost (False). While one transaction commits the next
writes queue up, so batching grows with load and adds no delay when idle.

When the database is unreachable a batch is tried once more after a short pause (a
connection the server dropped), then every waiter gets the error: a handler whose
decision was not committed sends nothing, and its job is claimed again after its lease.
A flush is bounded by a timeout, so a database that hangs cannot hold every handler (not
on SQLite, where a cancelled statement would keep the write lock; its busy timeout bounds
a flush there).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.store import JobWrite, Store, database_unavailable, db_error_text

log = structlog.get_logger("supervisor.writer")


@dataclass
class _Pending:
    write: JobWrite
    done: asyncio.Future[bool]


class BatchWriter:
    def __init__(
        self, store: Store, *, max_batch: int = 500, timeout: float | None = 30.0, retry_delay: float = 0.2
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._timeout = timeout
        self._retry_delay = retry_delay
        self.failures = 0
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

    async def _apply(self, writes: list[JobWrite]) -> list[bool]:
        async with asyncio.timeout(self._timeout):
            return await self._store.apply_each(writes)

    async def _flush(self, batch: list[_Pending]) -> None:
        writes = [pending.write for pending in batch]
        try:
            try:
                applied = await self._apply(writes)
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                # Once more: a pooled connection the server dropped fails only this once.
                # (Should the first commit have landed unacknowledged, the retry finds
                # released leases and drops those writes, or re-applies the same values.)
                await asyncio.sleep(self._retry_delay)
                applied = await self._apply(writes)
        except Exception as exc:  # noqa: BLE001 - the database is down or refused: every waiter learns it
            self.failures += 1
            log.error(
                "database write failed",
                error=db_error_text(exc),
                writes=len(batch),
                database_unavailable=database_unavailable(exc),
            )
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
            return
        self.transactions += 1
        metrics.DB_WRITE_BATCH.observe(len(batch))
        metrics.LEASES_LOST.inc(applied.count(False))
        for pending, ok in zip(batch, applied, strict=True):
            if not pending.done.done():
                pending.done.set_result(ok)
        # Wake whoever waits for a flush; the next waiters get a fresh event.
        flushed, self._flushed = self._flushed, asyncio.Event()
        flushed.set()
