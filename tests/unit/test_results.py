"""A job's results: the client's paging (client.results over httpx.MockTransport) and the
file it is written to (JSON lines and CSV, 0600, continued where a file ends)."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_clado import JOB, STATUS_PATH, Recorder, client_for, ok

from supervisor.adapters.clado import BodyTooLarge, ResultsPage, UnreadableBody
from supervisor.adapters.results import ResultsFile, ResultsFileError, save_results


def people(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"name": f"p{i}", "title": "CTO", "company": {"name": f"c{i}"}} for i in range(start, stop)]


def paged(total: int, status: str = "completed", *, pagination: bool = True, size_honoured: bool = True) -> Any:
    """The status endpoint of a job with `total` results, serving `page` and `page_size`."""

    def handle(request: httpx.Request) -> httpx.Response:
        page, size = int(request.url.params["page"]), int(request.url.params["page_size"])
        start = (page - 1) * size if size_honoured else 0
        stop = min(total, start + size) if size_honoured else total
        body: dict[str, Any] = {"job_id": JOB, "status": status, "message": "m", "total_results": total}
        body["results"] = people(start, stop)
        if pagination:
            body["pagination"] = {"page": page, "page_size": size, "has_next": start + size < total}
        return ok(body)

    return handle


async def pages(handler: Recorder, start: int = 0, **options: Any) -> list[ResultsPage]:
    async with client_for(handler) as client:
        return [page async for page in client.results(JOB, start=start, **options)]


@pytest.mark.parametrize("total", [0, 1, 99, 100, 101, 250, 1000])
async def test_results_are_read_100_a_page_each_once_in_order(total: int) -> None:
    handler = Recorder(paged(total))
    found = await pages(handler)
    assert [result for page in found for result in page.results] == people(0, total)
    assert [r.url.path for r in handler.requests] == [STATUS_PATH] * len(handler.requests)
    assert [dict(r.url.params) for r in handler.requests] == [
        {"page": str(n), "page_size": "100"} for n in range(1, max(1, -(-total // 100)) + 1)
    ]
    assert handler.requests[0].headers["Authorization"].startswith("Bearer ")
    assert not found[-1].more and found[-1].is_final and found[-1].count == total


@pytest.mark.parametrize(("start", "first_page"), [(0, 1), (99, 1), (100, 2), (145, 2), (250, 3)])
async def test_results_start_where_asked_without_asking_for_earlier_pages(start: int, first_page: int) -> None:
    handler = Recorder(paged(250))
    found = await pages(handler, start=start)
    assert [result for page in found for result in page.results] == people(start, 250)
    assert handler.requests[0].url.params["page"] == str(first_page)


async def test_without_pagination_a_full_page_asks_for_the_next_and_a_short_one_ends() -> None:
    handler = Recorder(paged(230, pagination=False))
    found = await pages(handler)
    assert [result for page in found for result in page.results] == people(0, 230)
    assert handler.calls == 3


async def test_an_api_that_ignores_page_size_gives_everything_once() -> None:
    handler = Recorder(paged(180, size_honoured=False))
    found = await pages(handler)
    assert [result for page in found for result in page.results] == people(0, 180)
    assert handler.calls == 1


async def test_paging_stops_at_the_page_bound_and_says_there_is_more() -> None:
    handler = Recorder(paged(10_000_000, status="searching"))
    found = await pages(handler, max_pages=3)
    assert handler.calls == 3
    assert sum(len(page.results) for page in found) == 300
    assert found[-1].more and not found[-1].is_final


async def test_a_page_over_the_body_bound_is_asked_for_again_at_half_the_size() -> None:
    handler = Recorder(paged(250))
    async with client_for(handler, max_body=1500) as client:  # 12 of these results fit, 25 do not
        found = [page async for page in client.results(JOB, start=30)]
    assert [result for page in found for result in page.results] == people(30, 250)
    sizes = [int(request.url.params["page_size"]) for request in handler.requests]
    assert sizes[0] == 100 and sizes[-1] == 12 and sorted(set(sizes), reverse=True) == [100, 50, 25, 12]
    assert all(size == 12 for size in sizes[sizes.index(12) :])  # once it fits, it stays at that size


async def test_a_single_result_over_the_body_bound_is_an_error_not_a_loop() -> None:
    handler = Recorder(paged(3))
    with pytest.raises(BodyTooLarge, match="over 50 bytes"):
        async with client_for(handler, max_body=50) as client:
            [page async for page in client.results(JOB)]
    assert handler.requests[-1].url.params["page_size"] == "1"


async def test_a_page_without_a_results_list_is_unreadable_and_never_logged() -> None:
    handler = Recorder(ok({"job_id": JOB, "status": "completed", "results": "oops"}))
    with pytest.raises(UnreadableBody, match="no results list"):
        await pages(handler)


# -- the file --------------------------------------------------------------------------------------


def serving(results: list[Any]) -> Any:
    """The status endpoint of a completed job holding `results`."""

    def handle(request: httpx.Request) -> httpx.Response:
        page, size = int(request.url.params["page"]), int(request.url.params["page_size"])
        start = (page - 1) * size
        chunk = results[start : start + size]
        pagination = {"page": page, "page_size": size, "has_next": start + size < len(results)}
        return ok({"job_id": JOB, "status": "completed", "results": chunk, "total_results": len(results),
                   "pagination": pagination})  # fmt: skip

    return handle


async def save(results: list[Any], path: Path, fmt: str = "jsonl") -> tuple[Any, int]:
    """Saved, and the first page asked for."""
    handler = Recorder(serving(results))
    async with client_for(handler) as client:
        saved = await save_results(client, JOB, ResultsFile(fmt, path=str(path)))  # type: ignore[arg-type]
    return saved, int(handler.requests[0].url.params["page"])


async def test_jsonl_is_created_0600_and_a_rerun_appends_only_what_is_new(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    os.umask(0o022)
    saved, _ = await save(people(0, 130), out)
    assert (saved.written, saved.total, saved.final, saved.complete) == (130, 130, True, True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    saved, page = await save(people(0, 170), out)  # the job was continued: 40 more
    assert page == 2 and (saved.written, saved.total) == (40, 170)  # 130 held: page 2 from its 31st
    assert [json.loads(line) for line in out.read_text().splitlines()] == people(0, 170)


async def test_a_jsonl_record_cut_short_is_cut_off_and_written_again(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    whole = "".join(json.dumps(result) + "\n" for result in people(0, 5))
    out.write_text(whole + json.dumps(people(5, 6)[0])[:9])
    out.chmod(0o644)
    saved, _ = await save(people(0, 8), out)
    assert saved.written == 3
    assert [json.loads(line) for line in out.read_text().splitlines()] == people(0, 8)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


async def test_a_file_that_is_not_results_is_refused_untouched(tmp_path: Path) -> None:
    out = tmp_path / "notes.jsonl"
    out.write_text("my notes\nmore\n")
    out.chmod(0o644)
    with pytest.raises(ResultsFileError, match="line 1 is not JSON"):
        await save(people(0, 3), out)
    assert out.read_text() == "my notes\nmore\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    with pytest.raises(ResultsFileError, match="cannot open for writing"):
        await save(people(0, 3), tmp_path)  # a directory


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(), newline="")))


async def test_csv_has_a_header_keeps_every_field_and_continues_past_quoted_newlines(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    first = [{"name": 'Ada "the" Lovelace', "bio": "line one\nline two", "n": 3}, {"name": "Ben", "bio": None}]
    saved, _ = await save(first, out, "csv")
    assert saved.total == 2
    assert read_csv(out) == [["name", "bio", "n", "_extra"], ['Ada "the" Lovelace', "line one\nline two", "3", ""],
                             ["Ben", "", "", ""]]  # fmt: skip
    # Cut inside a quoted field: that record is written again, whole; a later field the
    # header lacks goes to _extra, so nothing paid for is dropped.
    content = out.read_bytes()
    out.write_bytes(content[: content.index(b"line two")])
    later = [*first, {"name": "Cy", "skills": ["go", "sql"]}]
    saved, _ = await save(later, out, "csv")
    assert (saved.written, saved.total) == (3, 3)  # the header stayed; Ada, cut, is written again
    rows = read_csv(out)
    assert rows[0] == ["name", "bio", "n", "_extra"] and len(rows) == 4
    assert rows[3] == ["Cy", "", "", '{"skills":["go","sql"]}']
