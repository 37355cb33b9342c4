"""The event loop a process runs on: uvloop's (a core dependency wherever it builds, so not
on Windows), else asyncio's own. Its own small module, so that a CLI command that fails fast (a bad job id)
does not import the daemon to find out which loop it would have used."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed, else None (asyncio's default)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    """Which event loop this code runs on ("uvloop" or "asyncio"), for the start-up line."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on the loop `loop_factory` chooses: uvloop cuts the event loop's own
    share of the CPU a poll costs (see bench/ and README's Performance section)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)
