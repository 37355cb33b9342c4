"""Which cancelled jobs' results are still to be written to their policy's keep_results
directory, and the record that one was (with its event, in one transaction)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from supervisor.adapters.store.database import IN_LIST, Database
from supervisor.adapters.tables import job_events, jobs, kept_results
from supervisor.core.job import Job
from supervisor.core.states import State
from supervisor.core.transitions import Event

# Over for the API and for the supervisor: its results will not grow unless someone continues
# it (a completed job whose cancel lost the race is one the supervisor cancelled too).
_FINAL = (State.CANCELLED.value, State.COMPLETED.value, State.FAILED.value)


class KeptResults(Database):
    async def results_to_keep(
        self, policies: Collection[str], *, others: bool, limit: int, excluded: Collection[str] = ()
    ) -> list[Job]:
        """Jobs the supervisor decided to cancel, final, whose results are not written yet,
        oldest decision first: those on `policies`, or with `others` those on any policy but
        `policies` (the default keeps results, so a policy without the key does too); not
        the `excluded` ones (waiting to be tried again), so they never crowd out the rest."""
        on_policy = jobs.c.policy.not_in(policies) if others else jobs.c.policy.in_(policies)
        query = (
            select(jobs)
            .outerjoin(kept_results, kept_results.c.job_id == jobs.c.job_id)
            .where(kept_results.c.job_id.is_(None))
            .where(jobs.c.cancel_requested_at.is_not(None))
            .where(jobs.c.final_status.is_not(None))
            .where(jobs.c.state.in_(_FINAL))
            .where(on_policy)
            .where(jobs.c.job_id.not_in(list(excluded)[:IN_LIST]))
            .order_by(jobs.c.cancel_requested_at, jobs.c.job_id)
            .limit(limit)
        )
        return await self._jobs(query)

    async def results_kept(self, job_id: str, now: datetime, path: str, results: int) -> bool:
        """Record that the job's results are in `path` (and say so in its events, with the
        path and the count, never a result). False when the job is gone (retention)."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(kept_results), {"job_id": job_id, "kept_at": now, "path": path, "results": results}
                )
                event = Event("results_kept", now, detail={"path": path, "results": results})
                await conn.execute(insert(job_events), {"job_id": job_id, **event.row()})
        except IntegrityError:
            return False  # pruned meanwhile, or recorded by another replica first
        return True
