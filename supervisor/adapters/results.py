"""A job's results written to a file: JSON lines or CSV, owner-only (0600), resumable.

Results are the customer's data, each one billed: nothing here logs them, and an error names
the file and the problem, never a result.

Resumable: a file an earlier run wrote (same job, same format) is continued, not started
over. Its complete records are counted, a record cut short (a run killed mid-write) is cut
off, and the results from that index on are appended. Each page is appended and fsynced
before the next one is asked for, so a crash loses at most the page being written. The API
serves a job's results in a stable order, new ones at the end (a continued job appends), so a
rerun after the job grew fetches only what is new.

CSV: the header is the fields of the first page's results, in the order first seen, then
`_extra`, which holds (as a JSON object) any field of a later result that the header lacks:
nothing paid for is dropped. Values that are objects or lists are JSON; null is empty.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

from supervisor.adapters.clado import CladoClient

Format = Literal["jsonl", "csv"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv")
EXTRA = "_extra"
FILE_MODE = 0o600


class ResultsFileError(Exception):
    """The results file cannot be written, or is not one this module wrote."""


@dataclass(frozen=True)
class Saved:
    written: int  # results appended by this run
    total: int  # results in the file now (for stdout: this run's)
    status: str | None  # the job's remote status on the last page read (None: no page read)
    final: bool  # the job is over: a rerun finds nothing new (unless someone continues it)
    complete: bool  # False: stopped at the page bound with more to read; a rerun continues


def _jsonl_prefix(content: bytes, path: str) -> tuple[int, int]:
    """(bytes of complete records, records) of a JSON lines file; the rest was cut short."""
    end = content.rfind(b"\n") + 1
    for number, line in enumerate(content[:end].splitlines(), 1):
        try:
            json.loads(line)
        except ValueError:
            raise ResultsFileError(f"{path}: line {number} is not JSON: not a results file to continue") from None
    return end, content[:end].count(b"\n")


def _csv_prefix(content: bytes) -> tuple[int, int]:
    """(bytes of complete records, records, the header included) of a CSV file: a record ends
    at a newline outside quotes (quotes inside a field are doubled, so an even count of them
    so far means outside)."""
    end = records = quotes = 0
    for index, byte in enumerate(content):
        if byte == 0x22:  # "
            quotes += 1
        elif byte == 0x0A and quotes % 2 == 0:  # \n
            end, records = index + 1, records + 1
    return end, records


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ResultsFile:
    """Where `save_results` writes: a path (created 0600, continued if it exists) or a
    stream (stdout: written from the first result, nothing to continue)."""

    def __init__(self, fmt: Format, path: str | None = None, stream: IO[str] | None = None) -> None:
        if (path is None) == (stream is None):
            raise ValueError("a path or a stream")
        self.format = fmt
        self.path = path
        self._stream = stream
        self._fd: int | None = None
        self._header: list[str] | None = None
        self.count = 0

    def open(self) -> int:
        """Open (or create) the file and find where it ends; returns the results it holds."""
        if self.path is None:
            return 0
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise ResultsFileError(f"{self.path}: cannot open for writing: {exc.strerror}") from None
        self._fd = fd
        try:
            with os.fdopen(os.dup(fd), "rb") as existing:
                content = existing.read()
            if self.format == "jsonl":
                end, self.count = _jsonl_prefix(content, self.path)
            else:
                end, records = _csv_prefix(content)
                if records:
                    self._header = next(csv.reader(io.StringIO(content[:end].decode("utf-8", "replace"))))
                    if not self._header or self._header[-1] != EXTRA:
                        raise ResultsFileError(
                            f"{self.path}: its first line is not a results header: not a file to continue"
                        )
                self.count = max(0, records - 1)
            os.fchmod(fd, FILE_MODE)  # an existing file too: what it holds is private
            os.ftruncate(fd, end)
            os.lseek(fd, end, os.SEEK_SET)
        except OSError as exc:
            self.close()
            raise ResultsFileError(f"{self.path}: {exc.strerror}") from None
        except ResultsFileError:
            self.close()
            raise
        return self.count

    def append(self, results: Sequence[Any]) -> None:
        """Write `results` after what the file holds, durably (fsync) for a path."""
        data = self._jsonl(results) if self.format == "jsonl" else self._csv(results)
        if self._stream is not None:
            self._stream.write(data)
            self._stream.flush()
        else:
            assert self._fd is not None  # noqa: S101 - open() came first
            encoded = data.encode("utf-8")
            try:
                while encoded:
                    encoded = encoded[os.write(self._fd, encoded) :]
                os.fsync(self._fd)
            except OSError as exc:
                raise ResultsFileError(f"{self.path}: cannot write: {exc.strerror}") from None
        self.count += len(results)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _jsonl(self, results: Sequence[Any]) -> str:
        return "".join(json.dumps(result, ensure_ascii=False, separators=(",", ":")) + "\n" for result in results)

    def _csv(self, results: Sequence[Any]) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        if self._header is None:
            fields = dict.fromkeys(key for result in results if isinstance(result, dict) for key in result)
            fields.pop(EXTRA, None)
            self._header = [*fields, EXTRA]
            writer.writerow(self._header)
        known = set(self._header[:-1])
        for result in results:
            if not isinstance(result, dict):
                writer.writerow([""] * len(known) + [_cell(result)])
                continue
            extra = {key: value for key, value in result.items() if key not in known}
            writer.writerow([_cell(result.get(key)) for key in self._header[:-1]] + [_cell(extra) if extra else ""])
        return out.getvalue()


async def save_results(client: CladoClient, job_id: str, target: ResultsFile) -> Saved:
    """Page through the job's results from where `target` ends and append them to it. The
    file work runs in a thread: the daemon's loop never waits on a disk."""
    start = await asyncio.to_thread(target.open)
    written = 0
    last = None
    writing: asyncio.Future[None] | None = None
    try:
        async for page in client.results(job_id, start=start):
            if page.results:
                writing = asyncio.ensure_future(asyncio.to_thread(target.append, page.results))
                await writing
                written += len(page.results)
            last = page
    finally:
        # Cancelled (a timeout, shutdown) while a thread writes: the file is closed once that
        # write is done, never under it (its descriptor could be reused by another file).
        if writing is not None and not writing.done():
            writing.add_done_callback(lambda _: target.close())
        else:
            target.close()
    return Saved(
        written=written,
        total=target.count,
        status=last.status if last else None,
        final=bool(last and last.is_final),
        complete=last is None or not last.more,
    )
