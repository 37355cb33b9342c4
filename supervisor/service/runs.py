"""The runs of the daemon's services now going: each scheduled run (APScheduler's) and each
one started outside the schedule (a chore catching up, a reload). The daemon's stop waits
for them, bounded, and cancels the late ones; a run cancelled because the daemon stops ends
quietly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


class Runs:
    def __init__(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping
        self._going: set[asyncio.Task[object]] = set()

    def tracked(self, body: Callable[[], Awaitable[object]]) -> Callable[[], Coroutine[Any, Any, None]]:
        """`body` as a run that `finish` can wait for (and, late, cancel quietly)."""

        async def run() -> None:
            task = asyncio.current_task()
            if task is None:  # pragma: no cover - a coroutine awaited here always runs in a task
                raise RuntimeError("a scheduled run outside a task")
            self._going.add(task)
            try:
                await body()
            except asyncio.CancelledError:
                if not self._stopping.is_set():
                    raise
            finally:
                self._going.discard(task)

        # APScheduler names a job after these in its log lines ("Dispatcher.tick …").
        run.__name__, run.__qualname__ = body.__name__, body.__qualname__
        return run

    def spawn(self, body: Callable[[], Awaitable[None]], name: str) -> None:
        """Run `body` now, outside the schedule, as a run `finish` waits for."""
        task = asyncio.create_task(self.tracked(body)(), name=name)
        self._going.add(task)  # also while it waits for its first step
        task.add_done_callback(self._going.discard)

    async def finish(self, within: float) -> None:
        """Let the runs going now finish within `within` seconds; cancel the rest."""
        if not self._going:
            return
        _, late = await asyncio.wait(set(self._going), timeout=within)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
