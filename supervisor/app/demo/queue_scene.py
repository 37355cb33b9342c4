"""The demo's queue scene: once the ops job has spent its team's hourly budget, a further
submission with queue=True is stored as `queued` (its reason and expected start printed),
and the daemon's drain starts it when the demo's clock turns the hour."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text

from supervisor.app.demo.scenes import HOURS_BUDGET_JOB, OPS_BUDGET, QUEUED_JOB, DemoClock
from supervisor.app.demo.view import progress_line
from supervisor.app.operations import Operations
from supervisor.app.views import QueueItemView
from supervisor.core.budgets import BudgetStatus, statuses
from supervisor.core.queueing import STARTED, period_starts
from supervisor.core.states import State

if TYPE_CHECKING:
    from supervisor.app.demo.tour import Tour

WAITING = ("queued", "initiating")  # still on its way to a job


class QueueScene:
    """The scene's state as the tour steps it: what was queued, and the job it became."""

    def __init__(self, clock: DemoClock) -> None:
        self.clock = clock
        self.item: QueueItemView | None = None  # the submission, as last read
        self.budget: BudgetStatus | None = None  # the ops budget when it was queued
        self.job_id: str | None = None
        self.started_at_once = False

    @property
    def done(self) -> bool:
        """Nothing more to wait for: its job is tracked, or it ended without one."""
        return self.job_id is not None or (self.item is not None and self.item.state not in WAITING)

    async def step(self, tour: Tour, ops: Operations) -> list[Text]:
        """What happened since the last look, one progress line each."""
        if self.item is None:
            return await self._submit_once_spent(tour, ops)
        if self.job_id is None and not self.done:
            self.item = await ops.queue_item(self.item.id)
            if self.item.state == STARTED and self.item.job_id:
                self._tracked(tour, self.item.job_id)
                at = self.item.initiated_at or self.clock.now()
                waited = (at - self.item.created_at).total_seconds()
                line = progress_line(tour.started, at, self.item.job_id, QUEUED_JOB.kind)
                line.append(f"started at {at:%H:%M:%S} UTC, as the hour turned, after {waited:.1f}s in the queue; "
                            f"the daemon tracks job {self.item.job_id[:8]}")  # fmt: skip
                return [line]
        return []

    async def _submit_once_spent(self, tour: Tour, ops: Operations) -> list[Text]:
        spender = next((row for row in tour.rows if tour.kinds.get(row.job_id) is HOURS_BUDGET_JOB), None)
        if spender is None or spender.state is not State.COMPLETED:
            return []
        labels = {"scenario": QUEUED_JOB.kind.replace(" ", "-"), **QUEUED_JOB.labels}
        now = self.clock.now()
        usage = await ops.store.usage(period_starts(ops.config, now), now)
        self.budget = next(s for s in statuses(ops.config, now, usage) if s.name == OPS_BUDGET)
        result = await ops.submit(QUEUED_JOB.scaled_query(tour.speed), limit=QUEUED_JOB.limit, labels=labels,
                                  queue=True)  # fmt: skip
        if not isinstance(result, QueueItemView):  # the budget had room after all: a failed check
            self.started_at_once = True
            self._tracked(tour, result.job_id)
            return []
        self.item = result
        line = progress_line(tour.started, result.created_at, result.id, QUEUED_JOB.kind)
        line.append("queued: ", style="bold")
        line.append(self._why(result))
        return [line]

    def _why(self, item: QueueItemView) -> str:
        starts = f", starts at {item.expected_start:%H:%M:%S} UTC" if item.expected_start else ""
        budget = self.budget
        if budget is None or item.reason != f"budget:{budget.name}":
            return f"{item.reason}{starts}"
        held = f" (+{budget.usage.reserved} reserved)" if budget.usage.reserved else ""
        return f"budget {budget.name} spent {budget.usage.spent}/{budget.credits}{held} this {budget.period}{starts}"

    def _tracked(self, tour: Tour, job_id: str) -> None:
        self.job_id = job_id
        tour.kinds[job_id] = QUEUED_JOB

    def summary(self) -> list[str]:
        item, budget = self.item, self.budget
        if item is None or budget is None or self.job_id is None or item.initiated_at is None:
            return []
        waited = (item.initiated_at - item.created_at).total_seconds()
        spent = f"spent {budget.usage.spent}/{budget.credits} this {budget.period}"
        line = (
            f"1 submission waited in the queue behind budget {budget.name} ({spent}); "
            f"the daemon started it when the hour turned, {waited:.1f}s later."
        )
        return [line]

    def problems(self) -> list[str]:
        if self.started_at_once:
            return ["the queued submission started at once: the ops budget was not spent when it was submitted"]
        if self.item is None:
            return ["nothing was queued: the ops job never completed its hour's budget"]
        if self.job_id is None:
            ended = "was still" if self.item.state in WAITING else "ended"
            return [f"the queued submission {ended} {self.item.state} ({self.item.reason}), never started"]
        if self.item.initiated_at is not None and self.item.initiated_at < self.clock.hour_turns_at:
            return ["the queued submission started before the hour turned, while its budget was spent"]
        return []
