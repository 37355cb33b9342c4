"""The status requests' slots: granted enforcing checks first, then by due time, so a
deadline claimed behind a backlog of probes does not wait for the backlog."""

from __future__ import annotations

import asyncio

from supervisor.core.job import CHECK_ENFORCE, CHECK_PROBE, CHECK_ROUTINE
from supervisor.service.polling import Turns


async def test_waiters_are_served_enforcing_first_then_by_due_time() -> None:
    turns = Turns(1)
    served: list[str] = []
    hold = asyncio.Event()

    async def job(name: str, priority: int, due: float) -> None:
        async with turns.turn(priority, due):
            served.append(name)
            if name == "first":
                await hold.wait()

    first = asyncio.create_task(job("first", CHECK_ROUTINE, 0))
    await asyncio.sleep(0)  # it holds the only slot
    # Queued in the order a claim would start them: the probes were claimed first.
    waiting = [
        asyncio.create_task(job(name, priority, due))
        for name, priority, due in [
            ("probe-early", CHECK_PROBE, 1),
            ("routine", CHECK_ROUTINE, 5),
            ("probe-late", CHECK_PROBE, 2),
            ("deadline", CHECK_ENFORCE, 9),
        ]
    ]
    await asyncio.sleep(0)
    hold.set()
    await asyncio.gather(first, *waiting)
    assert served == ["first", "deadline", "routine", "probe-early", "probe-late"]


async def test_a_waiter_cancelled_gives_up_its_place_and_a_slot_is_never_lost() -> None:
    turns = Turns(1)
    hold = asyncio.Event()
    served: list[str] = []

    async def job(name: str) -> None:
        async with turns.turn(CHECK_ROUTINE, 0):
            served.append(name)
            await hold.wait()

    first = asyncio.create_task(job("first"))
    await asyncio.sleep(0)
    gone = asyncio.create_task(job("gone"))
    later = asyncio.create_task(job("later"))
    await asyncio.sleep(0)
    gone.cancel()
    hold.set()
    await asyncio.gather(first, later, return_exceptions=True)
    assert served == ["first", "later"]
    # Every slot came back: a new comer is served at once.
    async with asyncio.timeout(1):
        async with turns.turn(CHECK_PROBE, 0):
            pass
