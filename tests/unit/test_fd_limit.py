"""The descriptor limit the daemon runs with, the admin API's share of it, and the log lines
a flood of connections would repeat."""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator

import pytest
import structlog

from supervisor.adapters import limits
from supervisor.adapters.ratelimit_log import RepeatFilter


@pytest.fixture
def restore_fd_limit() -> Iterator[tuple[int, int]]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_the_soft_limit_is_raised_to_the_hard_one(restore_fd_limit: tuple[int, int]) -> None:
    _, hard = restore_fd_limit
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"needs a finite hard limit of at least 512, not {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # what a login shell often gives

    fd = limits.raise_fd_limit()

    assert (fd.before, fd.soft, fd.hard, fd.raised) == (256, hard, hard, True)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_a_soft_limit_already_at_the_hard_one_is_left_alone(restore_fd_limit: tuple[int, int]) -> None:
    _, hard = restore_fd_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    fd = limits.raise_fd_limit()

    assert not fd.raised
    assert fd.error is None
    assert fd.soft == hard


@pytest.mark.parametrize(
    ("soft", "bound"),
    [(1024, 128), (256, 32), (64, 16), (65536, 256), (resource.RLIM_INFINITY, 256)],
)
def test_the_admin_api_takes_a_small_share_of_the_descriptors(soft: int, bound: int) -> None:
    assert limits.admin_connection_bound(soft) == bound


# -- repeated log lines -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: object, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, None)


def test_a_repeated_library_line_is_written_once_per_window_with_the_count_held_back() -> None:
    clock = Clock()
    limiter = RepeatFilter(window=10, clock=clock)
    written = []
    for second in range(25):  # one a second, as a flood of bad requests makes them
        clock.now = float(second)
        line = record("uvicorn.error", "Invalid HTTP request received.")
        if limiter.filter(line):
            written.append((second, line.getMessage()))

    assert written == [
        (0, "Invalid HTTP request received."),
        (10, "Invalid HTTP request received. (9 like it suppressed)"),
        (20, "Invalid HTTP request received. (9 like it suppressed)"),
    ]


def test_lines_differing_only_in_their_arguments_or_fields_count_as_one() -> None:
    clock = Clock()
    limiter = RepeatFilter(window=10, clock=clock)
    first = {"event": "admin API request failed", "path": "/v1/jobs"}
    second = {"event": "admin API request failed", "path": "/v1/submit"}
    assert limiter.filter(record("supervisor.http", first))
    assert not limiter.filter(record("supervisor.http", second))
    assert limiter.filter(record("asyncio", "socket.accept() out of system resource %s", "a"))
    assert not limiter.filter(record("asyncio", "socket.accept() out of system resource %s", "b"))
    assert limiter.filter(record("asyncio", "Unclosed connection %s", "c"))  # another template
    clock.now = 11.0
    later = record("supervisor.http", {"event": "admin API request failed", "path": "/healthz"})
    assert limiter.filter(later)
    assert later.msg == {"event": "admin API request failed", "path": "/healthz", "suppressed": 1}


def test_lines_held_back_when_the_flood_ended_inside_its_window_are_counted_at_exit() -> None:
    clock = Clock()
    limiter = RepeatFilter(window=10, clock=clock)
    for second in range(4):  # a 4 s flood: no line after the window would say the count
        clock.now = float(second)
        limiter.filter(record("supervisor.http", {"event": "admin API connection refused"}))
    assert limiter.filter(record("uvicorn.error", "Started server process"))  # nothing held back
    assert limiter.held_back() == [(("supervisor.http", logging.WARNING, "admin API connection refused"), 3)]
    assert limiter.held_back() == []  # said once


def test_the_supervisors_own_lines_about_jobs_are_never_held_back() -> None:
    limiter = RepeatFilter(window=10, clock=Clock())
    lines = [record("supervisor.effects", {"event": "cancel requested", "job_id": str(n)}) for n in range(50)]
    assert all(limiter.filter(line) for line in lines)


def test_the_keys_remembered_are_bounded() -> None:
    limiter = RepeatFilter(window=10, clock=Clock(), max_keys=8)
    for n in range(100):
        limiter.filter(record("uvicorn.error", f"line {n}"))
    assert len(limiter._seen) == 8


def test_a_structlog_line_carries_the_count_as_a_field(capsys: pytest.CaptureFixture[str]) -> None:
    from supervisor.adapters.logs import configure_logging

    configure_logging("json", "info")
    clock = Clock()
    root = logging.getLogger()
    limiter = RepeatFilter(window=10, clock=clock)
    root.handlers[0].addFilter(limiter)
    try:
        log = structlog.get_logger("supervisor.http")
        for second in (0, 1, 2, 12):
            clock.now = float(second)
            log.warning("admin API connection closed: no complete request in time", timeout_s=10)
    finally:
        root.handlers[0].removeFilter(limiter)
    lines = [line for line in capsys.readouterr().err.splitlines() if "admin API connection closed" in line]
    assert len(lines) == 2
    assert '"suppressed": 2' in lines[1]
    assert "suppressed" not in lines[0]
