"""The physical limit: a bare httpx loop polling job statuses as fast as it can.

`concurrency` worker tasks share one httpx.AsyncClient (pool limits = concurrency, like
CladoClient) and go round the given job ids, each request the supervisor's own status poll
(`GET /api/search/deep_research/{id}?page=1&page_size=1` with the bearer key), parsing
the JSON like the supervisor does. No database, no policy, no scheduler: what is left is
the cost of the HTTP client and the simulator.

Run in its own process (`python -m bench.bareloop ...`), it prints one JSON object:
requests done in the measured window, errors, the rate and the latency quantiles.

`--transport` is the daemon's own choice of transport (`supervisor.adapters.clado.make_transport`:
`aiohttp`, the default, is httpx-aiohttp with the client's error mapping; `httpx` is httpx's
own), and `--uvloop` runs it on uvloop, as the daemon does when uvloop is installed: the
same transport and loop as the daemon it is compared with. Its CPU per request is what the
supervisor's CPU per poll is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time

import httpx

from bench.common import API_KEY, quantile
from supervisor.adapters.clado import make_transport


def make_client(base_url: str, concurrency: int, transport: str, timeout: float = 10.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    chosen = make_transport(transport, concurrency)  # type: ignore[arg-type]
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {API_KEY}", "Accept": "application/json", "Accept-Encoding": "identity"},
        timeout=timeout,
        limits=limits,
        transport=chosen,
        follow_redirects=False,
    )


async def run(
    base_url: str, ids: list[str], concurrency: int, transport: str, duration: float, warmup: float
) -> dict[str, object]:
    client = make_client(base_url, concurrency, transport)
    cycle = itertools.cycle(ids)
    counting = False
    stop = False
    done = 0
    errors = 0
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal done, errors
        while not stop:
            job_id = next(cycle)
            started = time.perf_counter()
            try:
                response = await client.get(f"/api/search/deep_research/{job_id}", params={"page": 1, "page_size": 1})
                body = response.json()
                ok = response.status_code == 200 and isinstance(body.get("status"), str)
            except (httpx.HTTPError, ValueError):
                ok = False
            if counting:
                if ok:
                    done += 1
                    if len(latencies) < 200_000:
                        latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    counting = True
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.sleep(duration)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    counting = False
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    return {
        "transport": transport,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "concurrency": concurrency,
        "window_s": round(elapsed, 3),
        "requests": done,
        "errors": errors,
        "per_s": done / elapsed,
        "client_cpu_s": round(cpu, 3),
        "latency_p50_ms": quantile(latencies, 0.5) * 1000,
        "latency_p99_ms": quantile(latencies, 0.99) * 1000,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bareloop")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--ids", required=True, help="file with one job id a line")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--transport", choices=("httpx", "aiohttp"), default="httpx")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (as the daemon does when installed)")
    args = parser.parse_args(argv)
    with open(args.ids) as handle:
        ids = [line.strip() for line in handle if line.strip()]
    factory = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(run(args.base_url, ids, args.concurrency, args.transport, args.duration, args.warmup))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
