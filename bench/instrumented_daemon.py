"""`clado-supervisor` with a SQL statement counter: `python -m bench.instrumented_daemon ARGS`.

It is the CLI's own entry point (`supervisor.app.cli.main`, what `python -m supervisor` runs)
after one addition: a SQLAlchemy `before_cursor_execute` listener on every Engine counts
the statements the process sends, by kind, into two counters registered on the daemon's
own metrics registry, so they come out of its /metrics beside the tick and lag figures:

- clado_supervisor_bench_sql_calls_total{kind}: cursor.execute / executemany calls
  (driver round trips; psycopg 3 pipelines an executemany),
- clado_supervisor_bench_sql_rows_total{kind}: statements the database runs (an
  executemany of N parameter sets counts N; SQLAlchemy's insertmanyvalues already folds
  many rows into one INSERT, which counts one).

The listener costs a few microseconds per statement; the daemon sends a few hundred per
second at 10,000 jobs, so it stays far below the noise of the figures it sits beside.
"""

from __future__ import annotations

import re

from prometheus_client import Counter
from sqlalchemy import event
from sqlalchemy.engine import Engine

from supervisor.adapters import metrics

CALLS = Counter(
    metrics._P + "bench_sql_calls_total",
    "SQL cursor executions (executemany = 1), by kind.",
    ["kind"],
    registry=metrics.REGISTRY,
)
ROWS = Counter(
    metrics._P + "bench_sql_rows_total",
    "SQL statements run (executemany of N parameter sets = N), by kind.",
    ["kind"],
    registry=metrics.REGISTRY,
)

_SPACE = re.compile(r"\s+")


def classify(statement: str) -> str:
    """A coarse name for where a statement comes from in supervisor/store.py."""
    s = _SPACE.sub(" ", statement.strip()).lower()
    head = s.split(" where ", 1)[0]
    if s.startswith(("begin", "commit", "rollback", "pragma", "savepoint", "release")):
        return "txn_control"
    if s.startswith("select now()"):
        return "db_now"  # PostgreSQL: the lease clock (claim, lease extension, leader)
    if "leaders" in head:
        return "leader"
    if s.startswith("select") and "from jobs" in s and " order by jobs." in s and "next_check_at" in s:
        return "claim_select"
    if s.startswith("update jobs set lease_owner") and "where jobs.job_id in" in s:
        return "claim_update"
    if s.startswith("update jobs set lease_expires_at") and "returning" in s:
        return "lease_extend"
    if s.startswith("select jobs.job_id, jobs.lease_token from jobs"):
        return "write_check_lease"
    if s.startswith("update jobs set") and "where jobs.job_id = " in s:
        return "write_update"
    if s.startswith("insert into job_events"):
        return "write_events"
    if s.startswith(("insert into jobs", "select jobs.job_id from jobs where jobs.job_id in")):
        return "track"
    if "group by jobs.state" in s:
        return "gauges"
    if "admissions" in head or "budget_periods" in head or "sum(" in s:
        return "budgets"
    if s.startswith("select 1"):
        return "ping"
    return "other"


_kinds: dict[str, str] = {}


@event.listens_for(Engine, "before_cursor_execute")
def _count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
    kind = _kinds.get(statement)
    if kind is None:
        kind = _kinds.setdefault(statement, classify(statement))
    CALLS.labels(kind).inc()
    ROWS.labels(kind).inc(len(parameters) if executemany and parameters is not None else 1)


def without_uvloop() -> None:
    """BENCH_NO_UVLOOP=1: the daemon on asyncio's own event loop even though uvloop is
    installed, to measure what uvloop buys (`supervisor.adapters.eventloop.loop_factory`,
    which chooses the loop, is replaced from here: the supervisor is not edited)."""
    from supervisor.adapters import eventloop

    eventloop.loop_factory = lambda: None


def main() -> None:
    import os

    from supervisor.app.cli import main as cli_main

    if os.environ.get("BENCH_NO_UVLOOP") == "1":
        without_uvloop()

    cli_main(prog_name="clado-supervisor")


if __name__ == "__main__":
    main()
