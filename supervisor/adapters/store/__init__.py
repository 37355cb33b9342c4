"""Every SQL statement the supervisor runs, behind one `Store`.

The statements are split by what they store, one module each:
- database: URLs and drivers, the engine, SQLite's settings, which errors mean the
  database is away, and the read helpers the parts share;
- jobs: tracking new jobs, every Change applied fenced (by lease token or by the state its
  writer read), retention;
- leases: of jobs (claim, extend, release) and of roles (leader rows), in the database's
  clock, so replicas sharing one PostgreSQL database agree on who holds what;
- reads: jobs and their events;
- budgets: usage, admissions (reservations), budget periods;
- submissions: the scheduler's queue;
- routes and outbox: webhook events as rows written with their cause, their delivery
  (claims under a lease, attempts), the delivery log, and the counters' event stream.

`Store` is these parts as mixins over one `Database`, not a composition of part objects:
its callers (the daemon's services, the CLI, the HTTP API, the tests) ask one object for
everything, and one transaction may cross parts (`add_jobs` passes an admission's
reservation to its job and starts its submission). A statement that another part's
transaction borrows is a function of a connection (`budgets.settle_admission`,
`submissions.start_submission`), so no part calls another's methods.
"""

from __future__ import annotations

from supervisor.adapters.store.budgets import Budgets
from supervisor.adapters.store.database import (
    SqliteFileUnwritable,
    async_url,
    database_unavailable,
    db_error_text,
    private_sqlite_file,
    sync_url,
    utcnow,
)
from supervisor.adapters.store.jobs import Jobs, JobWrite, NewJob
from supervisor.adapters.store.kept import KeptResults
from supervisor.adapters.store.leases import Leases
from supervisor.adapters.store.outbox import Outbox
from supervisor.adapters.store.reads import JobReads
from supervisor.adapters.store.routes import DELIVERY_STATES, Routes
from supervisor.adapters.store.submissions import Submissions


class Store(Jobs, Leases, JobReads, Budgets, Submissions, KeptResults, Outbox):
    """The database of one process: open it with a URL (and an owner for its leases)."""


__all__ = [
    "DELIVERY_STATES",
    "JobWrite",
    "NewJob",
    "Routes",
    "SqliteFileUnwritable",
    "Store",
    "async_url",
    "database_unavailable",
    "db_error_text",
    "private_sqlite_file",
    "sync_url",
    "utcnow",
]
