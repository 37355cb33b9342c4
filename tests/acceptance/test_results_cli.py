"""`jobs results` as a user runs it: the real CLI against the simulator in its own process.
A job's results come out as JSON lines or CSV, to stdout or to a file created 0600; a rerun
with the same --output continues where the file ends (a run cut short, a job that grew) and
asks only for the pages it lacks; a bad job id is refused before any request."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sim.model import person

from .conftest import FakeApiProcess, cli, wait_for

PREFIX = "clado-supervisor: error: "


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    previous = os.umask(0o022)  # a login shell's: files default to world-readable
    yield
    os.umask(previous)


def status_calls(fake_api: FakeApiProcess) -> int:
    return int(fake_api.get("/_fake/stats")["status"])


def finished_job(fake_api: FakeApiProcess, results: int) -> str:
    job_id = fake_api.create_job(limit=results, rate=1000)
    wait_for(lambda: fake_api.job(job_id)["status"] == "completed", what="the job completed")
    return job_id


def test_results_as_json_lines_to_a_private_file_and_to_stdout(workdir: Path, fake_api: FakeApiProcess) -> None:
    job_id = finished_job(fake_api, 250)
    before = status_calls(fake_api)

    result = cli("jobs", "results", job_id, "--output", "out.jsonl", cwd=workdir)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["250 result(s) written to out.jsonl (250 in the file); job completed"]
    out = workdir / "out.jsonl"
    assert [json.loads(line) for line in out.read_text().splitlines()] == [person(job_id, i) for i in range(250)]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert status_calls(fake_api) - before == 3  # 100 a page

    # To stdout, with every log line on (debug): the results go where they were asked for,
    # never into a log line.
    config = workdir / "supervisor.toml"
    config.write_text(config.read_text().replace('level = "info"', 'level = "debug"'))
    piped = cli("jobs", "results", job_id, cwd=workdir)
    assert piped.returncode == 0, piped.stderr
    assert [json.loads(line) for line in piped.stdout.splitlines()] == [person(job_id, i) for i in range(250)]
    assert "linkedin" not in piped.stderr and "Hooli" not in piped.stderr


def test_results_as_csv(workdir: Path, fake_api: FakeApiProcess) -> None:
    job_id = finished_job(fake_api, 120)

    result = cli("jobs", "results", job_id, "--format", "csv", "--output", "out.csv", cwd=workdir)

    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO((workdir / "out.csv").read_text(), newline="")))
    assert rows == [{**person(job_id, i), "_extra": ""} for i in range(120)]
    assert stat.S_IMODE((workdir / "out.csv").stat().st_mode) == 0o600


def test_a_rerun_continues_a_cut_file_asking_only_for_the_pages_it_lacks(
    workdir: Path, fake_api: FakeApiProcess
) -> None:
    job_id = finished_job(fake_api, 250)
    out = workdir / "out.jsonl"
    # A first run killed while writing page 2: 145 whole results and half of the 146th.
    whole = "".join(json.dumps(person(job_id, i)) + "\n" for i in range(145))
    out.write_text(whole + json.dumps(person(job_id, 145))[:30])
    before = status_calls(fake_api)

    result = cli("jobs", "results", job_id, "--output", "out.jsonl", cwd=workdir)

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["105 result(s) written to out.jsonl (250 in the file); job completed"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == [person(job_id, i) for i in range(250)]
    assert status_calls(fake_api) - before == 2  # pages 2 and 3, not page 1 again
    again = cli("jobs", "results", job_id, "--output", "out.jsonl", cwd=workdir)
    assert again.stderr.splitlines() == ["0 result(s) written to out.jsonl (250 in the file); job completed"]


def test_a_running_job_s_results_so_far_then_the_rest_on_a_rerun(workdir: Path, fake_api: FakeApiProcess) -> None:
    job_id = fake_api.create_job(limit=400, rate=40)
    wait_for(lambda: fake_api.job(job_id)["results"] >= 5, what="the first results")

    first = cli("jobs", "results", job_id, "--output", "out.jsonl", cwd=workdir)

    assert first.returncode == 0, first.stderr
    assert (
        first.stderr.splitlines()[-1]
        == "the job is still running: run it again with the same --output later for the rest"
    )
    held = len((workdir / "out.jsonl").read_text().splitlines())
    assert held >= 5
    wait_for(lambda: fake_api.job(job_id)["status"] == "completed", timeout=60, what="the job completed")
    second = cli("jobs", "results", job_id, "--output", "out.jsonl", cwd=workdir)
    assert second.stderr.splitlines() == [
        f"{400 - held} result(s) written to out.jsonl (400 in the file); job completed"
    ]
    lines = (workdir / "out.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [person(job_id, i) for i in range(400)]


@pytest.mark.parametrize("bad", ["../etc/passwd", "a b", "-rf", ""])
def test_a_bad_job_id_is_refused_before_any_request(workdir: Path, fake_api: FakeApiProcess, bad: str) -> None:
    before = status_calls(fake_api)
    result = cli("jobs", "results", bad, "--output", "out.jsonl", cwd=workdir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert status_calls(fake_api) == before
    assert not (workdir / "out.jsonl").exists()


def test_an_output_that_is_not_a_results_file_is_refused_untouched(workdir: Path, fake_api: FakeApiProcess) -> None:
    job_id = finished_job(fake_api, 3)
    notes = workdir / "notes.txt"
    notes.write_text("my notes\n")
    result = cli("jobs", "results", job_id, "--output", "notes.txt", cwd=workdir)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{PREFIX}results: notes.txt: line 1 is not JSON: not a results file to continue"
    ]
    assert notes.read_text() == "my notes\n"
    assert stat.S_IMODE(notes.stat().st_mode) == 0o644
