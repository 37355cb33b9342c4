"""Poll cost: bytes per status poll, the supervisor's way vs a naive client's.

The supervisor asks for one result (`GET …/{job_id}?page=1&page_size=1`, what
CladoClient.status sends); a naive client GETs the status without `page`, which per the
docs returns every result so far. For jobs holding 10, 100 and 1,000 results (the API's
largest limit) on the simulator (its own process), `POLLS` polls of each kind over loopback
with httpx, measuring per poll:
- response bytes on the wire: status line + headers + body as HTTP/1.1 sends them
  (uvicorn answers with Content-Length, no chunking and no compression here), and the
  body alone, cross-checked with the simulator's own bytes_sent_status counter;
- latency (the simulator builds every result of an unpaged answer).
Then per day for 10,000 jobs polled every 15 s (57.6 M polls).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from bench import common
from bench.common import API_KEY, FakeApi

SIZES = (10, 100, 1000)
POLLS = 200
POLLS_PER_DAY_10K = 10_000 * 86_400 / 15


def _wire_bytes(response: httpx.Response) -> int:
    status_line = f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n".encode()
    headers = sum(len(name) + len(value) + 4 for name, value in response.headers.raw)
    return len(status_line) + headers + 2 + len(response.content)


def measure(client: httpx.Client, fake: FakeApi, job_id: str, paged: bool, polls: int) -> dict[str, Any]:
    params = {"page": 1, "page_size": 1} if paged else None
    wire, body, latencies = [], [], []
    before = fake.stats()["bytes_sent_status"]
    for _ in range(polls):
        started = time.perf_counter()
        response = client.get(f"/api/search/deep_research/{job_id}", params=params)
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        wire.append(_wire_bytes(response))
        body.append(len(response.content))
    served = fake.stats()["bytes_sent_status"] - before
    return {
        "polls": polls,
        "wire_bytes": sum(wire) / polls,
        "body_bytes": sum(body) / polls,
        "simulator_body_bytes": served / polls,
        "latency_ms_p50": common.quantile(latencies, 0.5) * 1000,
        "latency_ms_mean": 1000 * sum(latencies) / polls,
    }


def run(quick: bool = False, log: Any = print) -> dict[str, Any]:
    started = time.monotonic()
    info = common.machine_info()
    work = common.workdir("pollcost")
    fake = FakeApi(work)
    polls = 20 if quick else POLLS
    rows = []
    try:
        client = httpx.Client(base_url=fake.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        for size in SIZES:
            # Fast enough to be complete at once: the job holds exactly `size` results.
            job_id = fake.bulk(1, rate=100_000, limit=size)[0]
            common.wait_until(
                lambda job_id=job_id: fake.job(job_id)["status"] == "completed", timeout=10, what="job done"
            )
            paged = measure(client, fake, job_id, True, polls)
            unpaged = measure(client, fake, job_id, False, polls)
            rows.append(
                {
                    "results": size,
                    "paged": paged,
                    "unpaged": unpaged,
                    "unpaged_over_paged_bytes": unpaged["wire_bytes"] / paged["wire_bytes"],
                    "paged_gb_per_day_10k_jobs_15s": paged["wire_bytes"] * POLLS_PER_DAY_10K / 1e9,
                    "unpaged_gb_per_day_10k_jobs_15s": unpaged["wire_bytes"] * POLLS_PER_DAY_10K / 1e9,
                }
            )
        client.close()
    finally:
        fake.close()
    result = {
        "benchmark": "pollcost",
        "quick": quick,
        "machine": info,
        "method": "httpx over loopback to the simulator; wire bytes = status line + headers + body",
        "rows": rows,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    flat = [r["paged"]["wire_bytes"] for r in rows]
    result["targets"] = [
        {
            "target": "paged poll costs the same bytes whatever the result count (within 5%)",
            "value": max(flat) / min(flat),
            "met": max(flat) / min(flat) <= 1.05,
        }
    ]
    shutil.rmtree(work, ignore_errors=True)  # kept only when the run failed, for its logs
    name = "pollcost-quick" if quick else "pollcost"
    common.write_json(f"{name}.json", result)
    plot(result, common.RESULTS / f"{name}.png")
    log(render(result))
    return result


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        "Poll cost over loopback: the supervisor's poll (page=1&page_size=1) vs an unpaged GET (naive client)",
        common.table(
            [
                "results in job",
                "supervisor bytes/poll",
                "naive bytes/poll",
                "naive / supervisor",
                "supervisor ms",
                "naive ms",
                "supervisor GB/day*",
                "naive GB/day*",
            ],
            [
                [
                    r["results"],
                    r["paged"]["wire_bytes"],
                    r["unpaged"]["wire_bytes"],
                    r["unpaged_over_paged_bytes"],
                    r["paged"]["latency_ms_p50"],
                    r["unpaged"]["latency_ms_p50"],
                    r["paged_gb_per_day_10k_jobs_15s"],
                    r["unpaged_gb_per_day_10k_jobs_15s"],
                ]
                for r in rows
            ],
        ),
        "* 10,000 jobs polled every 15 s for a day (57.6 M polls), response bytes only; ms = latency p50",
        "",
        "Targets",
        common.table(
            ["target", "value", "met"],
            [[t["target"], t["value"], "yes" if t["met"] else "NO"] for t in result["targets"]],
        ),
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.plt()
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    x = list(range(len(rows)))
    labels = [f"{r['results']:,} results" for r in rows]
    ax = axes[0]
    sup = [r["paged"]["wire_bytes"] for r in rows]
    naive = [r["unpaged"]["wire_bytes"] for r in rows]
    ax.bar([i - 0.2 for i in x], sup, 0.4, label="supervisor: page=1&page_size=1", color="#1f77b4")
    ax.bar([i + 0.2 for i in x], naive, 0.4, label="naive: unpaged GET", color="#ff7f0e")
    for i, (a, b) in enumerate(zip(sup, naive, strict=True)):
        ax.annotate(f"{a:,.0f} B", (i - 0.2, a), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        ax.annotate(f"{b:,.0f} B", (i + 0.2, b), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, labels)
    ax.set_ylabel("response bytes per status poll (log)")
    ax.set_title("Bytes per poll")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar([i - 0.2 for i in x], [r["paged"]["latency_ms_p50"] for r in rows], 0.4, label="supervisor", color="#1f77b4")
    ax.bar(
        [i + 0.2 for i in x],
        [r["unpaged"]["latency_ms_p50"] for r in rows],
        0.4,
        label="naive (unpaged)",
        color="#ff7f0e",
    )
    ax.set_xticks(x, labels)
    ax.set_ylabel("latency p50, ms (loopback, simulator)")
    ax.set_title("Time per poll")
    ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"clado-supervisor poll cost - {m['nproc']} cores, Python {m['python']}, {m['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
