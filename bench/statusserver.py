"""A minimal Clado status server on the stdlib's asyncio: the cheapest API a bench can poll.

The simulator (`clado-supervisor fake-api`) models jobs, faults and billing, and costs a
core of its own at a few thousand requests a second. This server only answers what a
supervisor's poll needs, in the documented shape, so that the daemon's share of a poll's
cost is what is measured:

- `GET /api/search/deep_research/{id}`: `status` "processing" (or "pending", or
  "cancelled" once cancelled), an integer `created_at` (the server's start),
  `total_results` = `final_results_count` = ⌊elapsed × rate⌋, `results: []` and
  `pagination` (page 1 of n);
- `POST /api/search/deep_research/{id}/cancel`: `{"success": true}`, and the job reads
  cancelled from then on; the time it came is kept (the burst's deadline lateness);
- `GET /_stats`: the status calls answered, the cancels (job id → epoch seconds) and this
  process's CPU seconds.

A job's behaviour is its id's prefix (`bench/workloads.py` makes them): `steady-…` 1 result
per 5 s, `silent-…` 1 per 100 s, `pending-…` pending for good. HTTP/1.1 keep-alive; one
process, one event loop (asyncio's own: the issue's server used 0.07-0.08 cores at 667/s).

`python -m bench.statusserver --port N` prints "ready" once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time

PREFIX = "/api/search/deep_research/"
RATES = {"steady": 0.2, "silent": 0.01, "pending": 0.0}


class State:
    def __init__(self) -> None:
        self.started = time.time()
        self.created_at = int(self.started)
        self.status_calls = 0
        self.cancels: dict[str, float] = {}

    def status(self, job_id: str, page_size: int) -> dict[str, object]:
        kind = job_id.split("-", 1)[0]
        rate = RATES.get(kind, RATES["steady"])
        count = math.floor((time.time() - self.started) * rate)
        status = "pending" if kind == "pending" else "processing"
        if job_id in self.cancels:
            status = "cancelled"
        pages = max(1, math.ceil(count / max(1, page_size)))
        return {
            "job_id": job_id,
            "status": status,
            "created_at": self.created_at,
            "total_results": count,
            "final_results_count": count,
            "results": [],
            "pagination": {
                "page": 1,
                "page_size": page_size,
                "total_pages": pages,
                "total_results": count,
                "has_next": pages > 1,
            },
        }


def _response(code: int, body: object) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    reason = {200: "OK", 404: "Not Found"}.get(code, "OK")
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + payload


async def _serve(state: State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            path, _, query = target.partition("?")
            params = dict(part.partition("=")[::2] for part in query.split("&") if part)
            if method == "GET" and path.startswith(PREFIX):
                state.status_calls += 1
                body = state.status(path[len(PREFIX) :], int(params.get("page_size", "20") or 20))
                writer.write(_response(200, body))
            elif method == "POST" and path.startswith(PREFIX) and path.endswith("/cancel"):
                state.cancels.setdefault(path[len(PREFIX) : -len("/cancel")], time.time())
                writer.write(_response(200, {"success": True, "message": "cancelled"}))
            elif path == "/_stats":
                cpu = time.process_time()
                stats = {"status": state.status_calls, "cancels": state.cancels, "cpu_s": cpu}
                writer.write(_response(200, stats))
            else:
                writer.write(_response(404, {"detail": "not found"}))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def main_async(port: int) -> None:
    state = State()
    server = await asyncio.start_server(lambda r, w: _serve(state, r, w), "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.statusserver")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(main_async(args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
