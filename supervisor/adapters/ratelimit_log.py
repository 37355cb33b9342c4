"""Repeated log lines, rate-limited: at most one line per key per window, with a count of
the ones held back.

A flood of hostile connections to the admin API makes the same few lines again and again
("Invalid HTTP request received.", "Exceeded concurrency limit.", an accept() out of file
descriptors, "admin API request failed"); written each time they once grew the daemon's log
by 243 MB in 37 s. Only the loggers in `LIMITED_LOGGERS` are limited: the supervisor's own
lines about jobs (one per decision, each naming its job) are never held back.

A line's key is its logger, level and message template (for a structlog line its event), so
lines that differ only in their fields or arguments count as one. The first line of a key
is written; the next ones within `window` seconds are counted, not written; the first line
after the window says how many were held back (`suppressed`, a field of a structlog line; a
suffix of the text of a library's line). A flood that ends within its window has no such
next line: `held_back` gives those counts when the process stops, so they are said once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

# Loggers whose lines a client of the admin API (or the network) can cause at will.
LIMITED_LOGGERS = ("asyncio", "uvicorn", "supervisor.http")
WINDOW_SECONDS = 10.0
MAX_KEYS = 1024  # keys remembered; beyond, the least recently seen is forgotten

Key = tuple[str, int, str]


class RepeatFilter(logging.Filter):
    """A `logging.Filter` for the log handler (so it sees structlog's and libraries' lines)."""

    def __init__(
        self,
        window: float = WINDOW_SECONDS,
        loggers: tuple[str, ...] = LIMITED_LOGGERS,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        super().__init__()
        self._window = window
        self._loggers = loggers
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()  # records arrive from worker threads too
        # key → (when its last written line was, lines held back since)
        self._seen: OrderedDict[Key, tuple[float, int]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._limited(record.name):
            return True
        key = (record.name, record.levelno, _template(record))
        now = self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self._window:
                self._seen[key] = (last[0], last[1] + 1)
                self._seen.move_to_end(key)
                return False
            self._seen[key] = (now, 0)
            self._seen.move_to_end(key)
            while len(self._seen) > self._max_keys:
                self._seen.popitem(last=False)
        if last is not None and last[1]:
            _mark_suppressed(record, last[1])
        return True

    def held_back(self) -> list[tuple[Key, int]]:
        """Every key with lines held back since its last written one, and how many; they are
        forgotten (the process is stopping: nothing will say them otherwise)."""
        with self._lock:
            counts = [(key, held) for key, (_, held) in self._seen.items() if held]
            self._seen.clear()
        return counts

    def _limited(self, name: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self._loggers)


def _template(record: logging.LogRecord) -> str:
    if isinstance(record.msg, dict):  # structlog's event dict, wrapped for the formatter
        return str(record.msg.get("event", ""))[:200]
    return str(record.msg)[:200]


def _mark_suppressed(record: logging.LogRecord, count: int) -> None:
    if isinstance(record.msg, dict):
        record.msg = {**record.msg, "suppressed": count}
    else:
        record.msg = f"{record.getMessage()} ({count} like it suppressed)"
        record.args = ()
