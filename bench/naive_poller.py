"""The baseline: what a user would otherwise write to keep Clado jobs in check.

Poll every job every `interval` seconds (15 s, the supervisor's default poll interval) with
httpx, one small page per poll (`page=1&page_size=1`, so the comparison is about *when* it
polls, not what a poll costs — pollcost.py covers that), and cancel a job the first time a
poll shows it over a limit: results >= max_credits, or now - created_at >= max_runtime. A
job is dropped once it is cancelled or final. No retries, no confirmation, no database.

Run as its own process: `python -m bench.naive_poller --base-url URL`. It reads JSON lines
on stdin, one job each ({"job_id", "max_credits", "max_runtime"}), and starts watching each
job as soon as its line arrives; a line {"end": true} says no more will come. It prints one
JSON object when every job is done (or at --deadline):
{"jobs": {job_id: {"polls", "cancelled_at", "reason", "results_seen"}}, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx

FINAL = {"completed", "error", "cancelled"}


def _count(body: dict[str, Any]) -> int:
    for key in ("total_results", "final_results_count"):
        if isinstance(body.get(key), int):
            return int(body[key])
    pagination = body.get("pagination") or {}
    return int(pagination.get("total_results") or 0)


def _created(body: dict[str, Any]) -> float | None:
    """created_at as the docs show it (epoch seconds) or as ISO 8601."""
    value = body.get("created_at")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        return None
    parsed = datetime.fromisoformat(value)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


async def watch_all(base_url: str, api_key: str, interval: float, concurrency: int, deadline: float) -> dict[str, Any]:
    client = httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=10.0,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )
    slots = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    out: dict[str, dict[str, Any]] = {}

    async def watch(spec: dict[str, Any]) -> None:
        job_id = spec["job_id"]
        record: dict[str, Any] = {"polls": 0, "cancelled_at": None, "reason": None, "results_seen": None, "errors": 0}
        out[job_id] = record
        start = loop.time()
        k = 0
        while loop.time() < deadline:
            try:
                async with slots:
                    response = await client.get(
                        f"/api/search/deep_research/{job_id}", params={"page": 1, "page_size": 1}
                    )
                record["polls"] += 1
                body = response.json()
            except (httpx.HTTPError, ValueError):
                record["errors"] += 1
                body = None
            if body is not None and response.status_code == 200:
                results = _count(body)
                record["results_seen"] = results
                if body.get("status") in FINAL:
                    record["reason"] = record["reason"] or f"final:{body.get('status')}"
                    return
                created = _created(body)
                reason = None
                if spec.get("max_credits") is not None and results >= spec["max_credits"]:
                    reason = "max_credits"
                elif (
                    spec.get("max_runtime") is not None
                    and created is not None
                    and time.time() - created >= spec["max_runtime"]
                ):
                    reason = "max_runtime"
                if reason is not None:
                    async with slots:
                        await client.post(f"/api/search/deep_research/{job_id}/cancel")
                    record["cancelled_at"] = time.time()
                    record["reason"] = reason
                    return
            k += 1
            await asyncio.sleep(max(0.0, start + k * interval - loop.time()))

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = []
    while True:
        line = await reader.readline()
        if not line:
            break
        spec = json.loads(line)
        if spec.get("end"):
            break
        tasks.append(asyncio.create_task(watch(spec)))
    await asyncio.gather(*tasks)
    await client.aclose()
    return {"interval_s": interval, "jobs": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_poller")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--interval", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=300.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    api_key = os.environ.get("CLADO_API_KEY", "")

    async def go() -> dict[str, Any]:
        end = asyncio.get_running_loop().time() + args.deadline
        return await watch_all(args.base_url, api_key, args.interval, args.concurrency, end)

    result = asyncio.run(go())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
