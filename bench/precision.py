"""Precision: how far past its limits does a job get before it is cancelled?

One simulator (its own process), and on it, at the same moment, a fresh set of jobs for each
of three watchers:
- "supervisor": the daemon (`python -m supervisor run`, SQLite, poll_interval "15s",
  policies.default.max_credits = 100, every other setting at its default: tick 1 s,
  warn_at [0.8], confirm_interval 2 s);
- "supervisor tick 250ms": the same with `tick_interval = "250ms"` (a config knob; it shows
  how much of the overshoot is the tick, see DAEMONS);
- "naive": bench/naive_poller.py (poll each job every 15 s, cancel on breach).
Classes, `JOBS_PER_CLASS` jobs each per watcher:
- credits: 1, 5, 10 and 20 results/s, max_credits 100 (job limit 1000, so only a cancel stops them);
- runtime: 0.5 result/s, max_runtime "20s" (the daemons' per-job override via the admin
  API; the naive poller gets the same limit).
Jobs are made one at a time, at random moments over a few seconds (so they meet the 1 s
tick and the 15 s cycle at every phase), each handed to its watcher as soon as it exists:
the daemons through the admin API (POST /v1/jobs), the naive poller, already running,
through its stdin.

The paths of issue 11, in the same run and beside the naive poller (`PATHS`), each job's
limit `PATH_LIMIT` = 50 credits (the daemons' policy "fifty"; the naive poller is told 50):
- pending: tracked while still `pending` (0.5-3 s in the queue), then 5 or 10 results/s;
- steps: results 5 at a time, 10/s (the simulator's `step` knob);
- budget: a team budget of 90 credits shared by 3 jobs at 4 results/s (for the naive
  poller, the same rule: poll the 3 jobs every 15 s, cancel them all once they sum to 90);
- submit: `submit --limit 500` (the daemons' POST /v1/submit; the naive user initiates
  with limit 500 itself), 10 results/s;
- late: 5 results/s, handed over 0.3-1.5 s after the job started.

Figures, from the simulator's own record of each job (GET /_fake/jobs/{id}):
- credit overshoot = final results - 100 (the job is billed for every result it produced
  before the cancel landed);
- runtime lateness = first cancel call time - (created_at + 20 s), both in the simulator's clock;
- status calls per job, confirmation polls included (the naive poller makes none), and
  those made before the first cancel call (sampled every second);
- for the daemons, a breakdown from their own record (GET /v1/jobs: cancel_requested_at,
  cancel_detail.credits): how late the deciding poll was, and decision -> cancel call.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx

from bench import common
from bench.common import PY, REPO, Daemon, FakeApi

RATES = (1, 5, 10, 20)
JOBS_PER_CLASS = 20
MAX_CREDITS = 100
MAX_RUNTIME_S = 20
RUNTIME_RATE = 0.5
POLL_INTERVAL_S = 15
PATH_LIMIT = 50
BUDGET_CREDITS = 90
BUDGET_JOBS = 3
PATHS = ("pending", "steps", "budget", "submit", "late")


def _policies(groups: int) -> str:
    """The daemons' limits: the classes' default, the paths' policy "fifty", and one team
    budget per group of the budget path."""
    budgets = "".join(
        f'\n[budgets.team-{g}]\nmatch = {{ team = "g{g}" }}\nperiod = "day"\ncredits = {BUDGET_CREDITS}\n'
        for g in range(groups)
    )
    return f"""
[policies.default]
max_credits = {MAX_CREDITS}

[policies.fifty]
max_credits = {PATH_LIMIT}
{budgets}"""


# The daemons compared with the naive poller, each on its own database and its own jobs:
# the shipped defaults, and the same with a 250 ms tick (a config knob) — a job whose next
# check falls before the next tick waits for that tick, so the tick bounds how late a
# short re-poll (the last one before a credit limit) can be.
DAEMONS = {"supervisor": {}, "supervisor tick 250ms": {"tick_interval": '"250ms"'}}
WATCHERS = (*DAEMONS, "naive")


def run(quick: bool = False, log: Any = print) -> dict[str, Any]:
    per_class = 8 if quick else JOBS_PER_CLASS
    per_path = 6 if quick else 12
    groups = 2 if quick else 4
    started = time.monotonic()
    info = common.machine_info()
    work = common.workdir("precision")
    fake = FakeApi(work)
    daemons: dict[str, Daemon] = {}
    naive: subprocess.Popen[str] | None = None
    try:
        for index, (watcher, extra) in enumerate(DAEMONS.items()):
            port = common.free_port()
            config = work / f"supervisor-{index}.toml"
            config.write_text(
                common.config_text(
                    fake.base_url,
                    f"sqlite:///{work / f'precision-{index}.db'}",
                    listen=f"127.0.0.1:{port}",
                    supervisor={"poll_interval": f'"{POLL_INTERVAL_S}s"', **extra},
                    policies=_policies(groups),
                )
            )
            common.cli(["migrate"], cwd=work, config=config)
            daemons[watcher] = Daemon(work, config, port)
        naive = subprocess.Popen(
            [
                PY,
                "-m",
                "bench.naive_poller",
                "--base-url",
                fake.base_url,
                "--interval",
                str(POLL_INTERVAL_S),
                "--deadline",
                "240",
            ],
            cwd=REPO,
            env=common.child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # every watcher up (imports done) before the jobs exist

        classes = [(f"{rate}/s", {"rate": rate, "limit": 1000}) for rate in RATES]
        # created_at as ISO 8601: bench/naive_poller.py reads no other shape of it (the
        # simulator's default is the older docs' epoch seconds), and its runtime rule needs it.
        classes.append(("runtime", {"rate": RUNTIME_RATE, "limit": 1000, "created_at": "iso"}))
        jobs: dict[str, dict[str, list[str]]] = {name: {w: [] for w in WATCHERS} for name, _ in classes}
        if naive.stdin is None:  # for the type checker: stdin=PIPE always gives one
            raise RuntimeError("the naive poller has no stdin")
        # One job at a time, each handed to its watcher as soon as it exists, at random
        # moments over a few seconds: jobs meet the daemons' 1 s tick and the naive
        # poller's 15 s cycle at every phase, as jobs started by users would.
        rng = random.Random(7)
        for _ in range(per_class):
            for name, knobs in classes:
                for watcher in rng.sample(WATCHERS, len(WATCHERS)):
                    job_id = fake.bulk(1, **knobs)[0]
                    jobs[name][watcher].append(job_id)
                    max_runtime = MAX_RUNTIME_S if name == "runtime" else None
                    if watcher == "naive":
                        naive.stdin.write(
                            json.dumps({"job_id": job_id, "max_credits": MAX_CREDITS, "max_runtime": max_runtime})
                            + "\n"
                        )
                        naive.stdin.flush()
                    elif max_runtime is not None:
                        daemons[watcher].track([job_id], max_runtime=f"{max_runtime}s")
                    else:
                        daemons[watcher].track([job_id])
                time.sleep(rng.uniform(0.0, 0.08))
        paths, groups_of, naive_budget = _hand_over_paths(fake, daemons, naive.stdin, per_path, groups, rng)
        naive.stdin.write(json.dumps({"end": True}) + "\n")
        naive.stdin.flush()
        log(
            f"  {len(classes)} classes x {per_class} jobs and {len(PATHS)} paths x {per_path} jobs "
            f"x {len(WATCHERS)} watchers made and handed over; waiting for every job to stop"
        )

        all_ids = [j for sides in (*jobs.values(), *paths.values()) for side in sides.values() for j in side]
        # Status calls a job had had when its first cancel call was seen (sampled every
        # second; a daemon's confirmation poll comes confirm_interval = 2 s after it).
        calls_at_cancel: dict[str, int] = {}
        open_ids = set(all_ids)
        deadline = time.monotonic() + 200  # 1 result/s reaches 100 at 100 s; naive cancels by 115 s
        while open_ids:
            if time.monotonic() > deadline:
                where = sorted(
                    {f"{name}/{w}" for sides in (jobs, paths) for name, ws in sides.items() for w, ids in ws.items()
                     if open_ids & set(ids)}
                )  # fmt: skip
                raise RuntimeError(f"{len(open_ids)} job(s) never stopped: {', '.join(where)}")
            time.sleep(1.0)
            for job_id in list(open_ids):
                job = fake.job(job_id)
                if job["cancel_calls"] and job_id not in calls_at_cancel:
                    calls_at_cancel[job_id] = job["status_calls"]
                if job["status"] in ("cancelled", "completed", "error"):
                    open_ids.discard(job_id)

        # The daemons confirm through the status endpoint (confirm_interval 2 s): let them.
        def confirmed() -> bool:
            return all(
                row["state"] not in ("watching", "cancelling", "confirming")
                for daemon in daemons.values()
                for row in _daemon_jobs(daemon)
            )

        common.wait_until(confirmed, timeout=30, what="the daemons to confirm every cancel", interval=1.0)
        naive_budget.join(timeout=60)
        naive_out, _ = naive.communicate(timeout=260)
        naive_result = json.loads(naive_out)
        info_by_id = {j: fake.job(j) for j in all_ids}
        sup_jobs = {row["job_id"]: row for daemon in daemons.values() for row in _daemon_jobs(daemon)}
        daemon_exit, daemon_errors = {}, {}
        for watcher in list(daemons):
            daemon = daemons.pop(watcher)
            daemon_exit[watcher] = daemon.stop()
            daemon_errors[watcher] = daemon.errors()[:5]
    finally:
        for daemon in daemons.values():
            daemon.stop()
        if naive is not None and naive.poll() is None:
            naive.kill()
        fake.close()

    results: dict[str, Any] = {}
    for name, sides in jobs.items():
        results[name] = {}
        for side, ids in sides.items():
            infos = [info_by_id[j] for j in ids]
            calls = [float(i["status_calls"]) for i in infos]
            entry: dict[str, Any] = {
                "jobs": len(ids),
                "status_calls": common.summary(calls),
                "status_calls_before_cancel": common.summary(
                    [float(calls_at_cancel[j]) for j in ids if j in calls_at_cancel]
                ),
                "cancel_calls": sum(i["cancel_calls"] for i in infos),
                "final_status": sorted({i["status"] for i in infos}),
            }
            if name == "runtime":
                lateness = [
                    i["cancel_call_times"][0] - (i["created_at_ts"] + MAX_RUNTIME_S)
                    for i in infos
                    if i["cancel_call_times"]
                ]
                entry["lateness_s"] = common.summary(lateness)
                entry["not_cancelled"] = sum(1 for i in infos if not i["cancel_call_times"])
            else:
                overshoot = [float(i["results"] - MAX_CREDITS) for i in infos]
                entry["overshoot_credits"] = common.summary(overshoot)
                entry["time_to_cancel_s"] = common.summary(
                    [i["cancel_call_times"][0] - i["created_at_ts"] for i in infos if i["cancel_call_times"]]
                )
            if side in DAEMONS:
                entry["breakdown"] = _breakdown(name, ids, info_by_id, sup_jobs)
                entry["states"] = sorted({sup_jobs[j]["state"] for j in ids if j in sup_jobs})
                entry["reasons"] = sorted({str(sup_jobs[j]["cancel_reason"]) for j in ids if j in sup_jobs})
            else:
                entry["reasons"] = sorted({str(naive_result["jobs"][j]["reason"]) for j in ids})
            results[name][side] = entry
        nai = results[name]["naive"]
        for watcher in DAEMONS:
            sup = results[name][watcher]
            sup["status_calls_ratio"] = sup["status_calls"]["mean"] / nai["status_calls"]["mean"]
            sup["status_calls_before_cancel_ratio"] = (
                sup["status_calls_before_cancel"]["mean"] / nai["status_calls_before_cancel"]["mean"]
            )

    path_results = _path_results(paths, groups_of, info_by_id)

    def total(watcher: str, key: str) -> float:
        return sum(results[n][watcher][key]["mean"] for n in results)

    result = {
        "benchmark": "precision",
        "quick": quick,
        "machine": info,
        "setup": {
            "rates": list(RATES),
            "jobs_per_class": per_class,
            "max_credits": MAX_CREDITS,
            "max_runtime_s": MAX_RUNTIME_S,
            "runtime_rate": RUNTIME_RATE,
            "poll_interval_s": POLL_INTERVAL_S,
            "database": "sqlite",
            "warn_at": [0.8],
            "daemons": DAEMONS,
            "path_limit": PATH_LIMIT,
            "jobs_per_path": per_path,
            "budget": {"credits": BUDGET_CREDITS, "jobs": BUDGET_JOBS, "rate": 4, "groups": groups},
        },
        "classes": results,
        "paths": path_results,
        "status_calls_ratio_overall": {w: total(w, "status_calls") / total("naive", "status_calls") for w in DAEMONS},
        "status_calls_before_cancel_ratio_overall": {
            w: total(w, "status_calls_before_cancel") / total("naive", "status_calls_before_cancel") for w in DAEMONS
        },
        "daemon_exit": daemon_exit,
        "daemon_errors": daemon_errors,
    }
    result["targets"] = targets(result)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    shutil.rmtree(work, ignore_errors=True)  # kept only when the run failed, for its logs
    name = "precision-quick" if quick else "precision"
    common.write_json(f"{name}.json", result)
    plot(result, common.RESULTS / f"{name}.png")
    log(render(result))
    return result


def _hand_over_paths(
    fake: FakeApi, daemons: dict[str, Daemon], naive: IO[str], per_path: int, groups: int, rng: random.Random
) -> tuple[dict[str, dict[str, list[str]]], dict[str, list[list[str]]], threading.Thread]:
    """Make the jobs of every path for every watcher and hand them over; return their ids
    (path -> watcher -> ids), the budget path's groups per watcher, and the naive budget
    watcher's thread."""
    paths: dict[str, dict[str, list[str]]] = {name: {w: [] for w in WATCHERS} for name in PATHS}

    def hand(watcher: str, path: str, job_id: str, **fields: Any) -> None:
        paths[path][watcher].append(job_id)
        if watcher == "naive":
            naive.write(json.dumps({"job_id": job_id, "max_credits": PATH_LIMIT, "max_runtime": None}) + "\n")
            naive.flush()
        else:
            daemons[watcher].track([job_id], policy="fifty", **fields)

    for i in range(per_path):
        rate, queued = (5, 10)[i % 2], rng.uniform(0.5, 3.0)
        for watcher in rng.sample(WATCHERS, len(WATCHERS)):
            hand(watcher, "pending", fake.bulk(1, rate=rate, queue_for=queued, limit=1000)[0])
            hand(watcher, "steps", fake.bulk(1, rate=10, step=5, limit=1000)[0])
            if watcher == "naive":
                # The naive user asks the API for what they typed.
                hand(watcher, "submit", fake.bulk(1, rate=10, limit=500)[0])
            else:
                answer = common.http_json(
                    f"{daemons[watcher].admin_url}/v1/submit",
                    {"query": "bench submit fake:rate=10", "limit": 500, "policy": "fifty"},
                    token=common.ADMIN_TOKEN,
                )
                paths["submit"][watcher].append(answer["job_id"])
    # late: every job made at once, each handed over at its own moment 0.3-1.5 s later
    made = time.monotonic()
    late = sorted(
        (rng.uniform(0.3, 1.5), watcher, job_id)
        for watcher in WATCHERS
        for job_id in fake.bulk(per_path, rate=5, limit=1000)
    )
    for delay, watcher, job_id in late:
        time.sleep(max(0.0, made + delay - time.monotonic()))
        hand(watcher, "late", job_id)
    # budget: groups of 3 jobs at 4/s, each group under its own team budget of 90
    groups_of: dict[str, list[list[str]]] = {}
    for watcher in WATCHERS:
        groups_of[watcher] = [fake.bulk(BUDGET_JOBS, rate=4, limit=1000) for _ in range(groups)]
        for g, ids in enumerate(groups_of[watcher]):
            paths["budget"][watcher] += ids
            if watcher != "naive":
                daemons[watcher].track(ids, labels={"team": f"g{g}"})
    naive_budget = threading.Thread(
        target=_naive_budget, args=(fake.base_url, groups_of["naive"]), name="naive-budget", daemon=True
    )
    naive_budget.start()
    return paths, groups_of, naive_budget


def _naive_budget(base_url: str, groups: list[list[str]]) -> None:
    """The naive rule for a team budget: poll the team's jobs every 15 s (one page of one
    result, as the naive poller does) and cancel them all once their results sum to the budget."""
    key = os.environ.get("CLADO_API_KEY") or common.API_KEY
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
        open_groups = list(groups)
        start = time.monotonic()
        k = 0
        while open_groups and time.monotonic() - start < 240:
            for ids in list(open_groups):
                bodies = [
                    client.get(f"/api/search/deep_research/{j}", params={"page": 1, "page_size": 1}).json() for j in ids
                ]
                spent = sum(int(body.get("total_results") or 0) for body in bodies)
                if spent >= BUDGET_CREDITS or all(
                    body.get("status") in ("completed", "error", "cancelled") for body in bodies
                ):
                    for j in ids:
                        client.post(f"/api/search/deep_research/{j}/cancel")
                    open_groups.remove(ids)
            k += 1
            time.sleep(max(0.0, start + k * POLL_INTERVAL_S - time.monotonic()))


def _path_results(
    paths: dict[str, dict[str, list[str]]], groups_of: dict[str, list[list[str]]], infos: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per path and watcher: the figure the issue's table names (overshoot past 50, or a
    budget group's total spend, or what a submission asked the API for), and status calls
    per job with their ratio to the naive poller's."""
    out: dict[str, Any] = {}
    for path, sides in paths.items():
        out[path] = {}
        for watcher, ids in sides.items():
            rows = [infos[j] for j in ids]
            entry: dict[str, Any] = {
                "jobs": len(ids),
                "status_calls": common.summary([float(r["status_calls"]) for r in rows]),
            }
            if path == "budget":
                spent = [float(sum(infos[j]["results"] for j in group)) for group in groups_of[watcher]]
                entry["spent"] = common.summary(spent)
            else:
                entry["overshoot_credits"] = common.summary([float(r["results"] - PATH_LIMIT) for r in rows])
            if path == "submit":
                entry["asked_for"] = common.summary([float(r["limit"]) for r in rows])
                entry["spent"] = common.summary([float(r["results"]) for r in rows])
            out[path][watcher] = entry
        naive_calls = out[path]["naive"]["status_calls"]["mean"]
        for watcher in DAEMONS:
            out[path][watcher]["status_calls_ratio"] = out[path][watcher]["status_calls"]["mean"] / naive_calls
    return out


def _ts(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


def _breakdown(
    name: str, ids: list[str], infos: dict[str, dict[str, Any]], sup_jobs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Where the supervisor's overshoot / lateness comes from: the decision (its poll saw the
    breach; the daemon's cancel_requested_at and cancel_detail.credits) vs the path from the
    committed decision to the cancel call reaching the simulator. Same machine, same clock."""
    to_call, at_decision, after_decision, decision_late = [], [], [], []
    for job_id in ids:
        job, info = sup_jobs.get(job_id), infos[job_id]
        decided = _ts(job.get("cancel_requested_at")) if job else None
        if decided is None or not info["cancel_call_times"]:
            continue
        to_call.append(info["cancel_call_times"][0] - decided)
        if name == "runtime":
            decision_late.append(decided - (info["created_at_ts"] + MAX_RUNTIME_S))
        else:
            rate = float(name.split("/")[0])
            decision_late.append(decided - (info["created_at_ts"] + MAX_CREDITS / rate))
            credits = (job.get("cancel_detail") or {}).get("credits")
            if isinstance(credits, int):
                at_decision.append(float(credits - MAX_CREDITS))
                after_decision.append(float(info["results"] - credits))
    # decision_late_s: the deciding poll's time past the moment the limit was reached
    # (created_at + max_runtime; for credits, created_at + 100 / rate, when the simulator's
    # 100th result appears).
    out = {"decision_to_cancel_call_s": common.summary(to_call), "decision_late_s": common.summary(decision_late)}
    if name != "runtime":
        out["overshoot_at_decision"] = common.summary(at_decision)
        out["overshoot_after_decision"] = common.summary(after_decision)
    return out


def _daemon_jobs(daemon: Daemon) -> list[dict[str, Any]]:
    listed = common.http_json(f"{daemon.admin_url}/v1/jobs?limit=1000", token=common.ADMIN_TOKEN)
    return listed if isinstance(listed, list) else list(listed.get("jobs", []))


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, for the daemon with the shipped defaults."""
    out = []
    classes = result["classes"]
    for rate in RATES:
        name = f"{rate}/s"
        over = classes[name]["supervisor"]["overshoot_credits"]
        if rate <= 10:
            out.append(
                {"target": f"overshoot p50 <= 1 credit at {name}", "value": over["p50"], "met": over["p50"] <= 1}
            )
            out.append(
                {"target": f"overshoot p95 <= 3 credits at {name}", "value": over["p95"], "met": over["p95"] <= 3}
            )
    late = classes["runtime"]["supervisor"]["lateness_s"]
    out.append({"target": "runtime lateness p99 <= 1 s", "value": late["p99"], "met": late["p99"] <= 1.0})
    for name in classes:
        ratio = classes[name]["supervisor"]["status_calls_ratio"]
        out.append({"target": f"status calls <= 1.5x naive ({name})", "value": ratio, "met": ratio <= 1.5})
    ratio = result["status_calls_ratio_overall"]["supervisor"]
    out.append({"target": "status calls <= 1.5x naive (all jobs)", "value": ratio, "met": ratio <= 1.5})
    paths = result["paths"]
    for path, (figure, bound, what) in PATH_TARGETS.items():
        value = paths[path]["supervisor"][figure]["max"]
        out.append({"target": f"{path}: {what}", "value": value, "met": value <= bound})
    value = paths["submit"]["supervisor"]["spent"]["max"]
    out.append({"target": "submit: spent <= 50", "value": value, "met": value <= PATH_LIMIT})
    for path in PATHS:
        ratio = paths[path]["supervisor"]["status_calls_ratio"]
        out.append({"target": f"status calls <= 1.5x naive ({path})", "value": ratio, "met": ratio <= 1.5})
    return out


# The table: path -> (figure, its bound for every job or group, what it says).
PATH_TARGETS = {
    "pending": ("overshoot_credits", 3, "each overshoot <= 3"),
    "steps": ("overshoot_credits", 8, "each overshoot <= 8"),
    "budget": ("spent", 95, "each team spends <= 95 of 90"),
    "submit": ("asked_for", PATH_LIMIT, "the API asked for <= 50"),
    "late": ("overshoot_credits", 3, "each overshoot <= 3"),
}
PATH_FIGURE = {
    "pending": "overshoot",
    "steps": "overshoot",
    "budget": "team spend",
    "submit": "asked for",
    "late": "overshoot",
}


def render(result: dict[str, Any]) -> str:
    classes = result["classes"]
    rows = []
    for name, sides in classes.items():
        for side in WATCHERS:
            entry = sides[side]
            fig = entry["lateness_s" if name == "runtime" else "overshoot_credits"]
            rows.append(
                [
                    name,
                    side,
                    "lateness s" if name == "runtime" else "overshoot credits",
                    fig["p50"],
                    fig["p95"],
                    fig["p99"],
                    fig["max"],
                    entry["status_calls"]["mean"],
                    entry["status_calls_before_cancel"]["mean"],
                    entry.get("status_calls_ratio"),
                ]
            )
    overall = result["status_calls_ratio_overall"]
    before = result["status_calls_before_cancel_ratio_overall"]
    lines = [
        (
            f"Precision at poll_interval {POLL_INTERVAL_S} s: max_credits {MAX_CREDITS}, "
            f"max_runtime {MAX_RUNTIME_S} s ({result['setup']['jobs_per_class']} jobs per class and watcher; "
            "naive = poll every 15 s, cancel on breach; supervisor = shipped defaults, tick 1 s)"
        ),
        common.table(
            [
                "class",
                "watcher",
                "figure",
                "p50",
                "p95",
                "p99",
                "max",
                "status calls/job",
                "of them before the cancel",
                "calls vs naive",
            ],
            rows,
        ),
        "",
        "Status calls per job, all classes, vs naive: "
        + "; ".join(
            f"{w} {overall[w]:.2f} (before the cancel, without the confirmation poll: {before[w]:.2f})" for w in DAEMONS
        ),
        "",
        (
            "Where a daemon's overshoot and lateness come from (p50 / p95): the deciding poll "
            "(how late after the limit was reached, and the credits it saw) "
            "vs decision committed -> cancel call at the simulator"
        ),
        common.table(
            [
                "class",
                "watcher",
                "decision late s",
                "past the limit at decision",
                "accrued after decision",
                "decision -> cancel call s",
            ],
            [
                [
                    name,
                    w,
                    _pp(classes[name][w]["breakdown"].get("decision_late_s")),
                    _pp(classes[name][w]["breakdown"].get("overshoot_at_decision")),
                    _pp(classes[name][w]["breakdown"].get("overshoot_after_decision")),
                    _pp(classes[name][w]["breakdown"]["decision_to_cancel_call_s"]),
                ]
                for name in classes
                for w in DAEMONS
            ],
        ),
        "",
        (
            f"The issue's paths (limit {PATH_LIMIT} credits a job; budget {BUDGET_CREDITS} over "
            f"{BUDGET_JOBS} jobs at 4/s; {result['setup']['jobs_per_path']} jobs a path and watcher)"
        ),
        common.table(
            ["path", "watcher", "figure", "p50", "p95", "max", "status calls/job", "calls vs naive"],
            [
                [
                    path,
                    w,
                    PATH_FIGURE[path],
                    entry["p50"],
                    entry["p95"],
                    entry["max"],
                    result["paths"][path][w]["status_calls"]["mean"],
                    result["paths"][path][w].get("status_calls_ratio"),
                ]
                for path in PATHS
                for w in WATCHERS
                for entry in [result["paths"][path][w][PATH_TARGETS[path][0]]]
            ],
        ),
        "",
        "Targets (supervisor with the shipped defaults)",
        common.table(
            ["target", "value", "met"],
            [[t["target"], t["value"], "yes" if t["met"] else "NO"] for t in result["targets"]],
        ),
    ]
    return "\n".join(lines)


def _pp(summary: dict[str, float] | None) -> str | None:
    if not summary or not summary.get("n"):
        return None
    return f"{common._cell(summary['p50'])} / {common._cell(summary['p95'])}"


def plot(result: dict[str, Any], path: Path) -> None:
    plt = common.plt()
    classes = result["classes"]
    fig, axes = plt.subplots(1, 4, figsize=(24, 5.5))
    names = [f"{r}/s" for r in RATES]
    x = list(range(len(names)))
    colors = {"supervisor": "#1f77b4", "supervisor tick 250ms": "#2ca02c", "naive": "#ff7f0e"}
    width = 0.27
    offsets = {w: (i - 1) * width for i, w in enumerate(WATCHERS)}

    ax = axes[0]
    for side in WATCHERS:
        over = [classes[n][side]["overshoot_credits"] for n in names]
        p50 = [max(o["p50"], 0.1) for o in over]
        p95 = [max(o["p95"], 0.1) for o in over]
        xs = [i + offsets[side] for i in x]
        ax.bar(xs, p50, width, color=colors[side], label=f"{side}: p50 (whisker p95, dot max)")
        ax.errorbar(
            xs,
            p50,
            yerr=[[0] * len(x), [max(b - a, 0) for a, b in zip(p50, p95, strict=True)]],
            fmt="none",
            ecolor="black",
            capsize=3,
        )
        ax.plot(xs, [max(o["max"], 0.1) for o in over], "k.", ms=5)
        for xi, o in zip(xs, over, strict=True):
            ax.annotate(
                f"{o['p50']:g}",
                (xi, max(o["p50"], 0.1)),
                textcoords="offset points",
                xytext=(0, 2),
                ha="center",
                fontsize=7,
            )
    ax.axhline(1, color="red", ls="--", lw=1, label="target p50 <= 1")
    ax.axhline(3, color="red", ls=":", lw=1, label="target p95 <= 3 (up to 10/s)")
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{n}\n(limit {MAX_CREDITS})" for n in names])
    ax.set_xlabel("job's result rate")
    ax.set_ylabel("credits charged past the limit (log; 0 drawn at 0.1)")
    ax.set_title("Credit overshoot (label: p50)")
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[1]
    for side in WATCHERS:
        late = classes["runtime"][side]["lateness_s"]
        values = [late["p50"], late["p95"], late["p99"], late["max"]]
        ax.bar(
            [i + offsets[side] for i in range(4)],
            [max(v, 0.001) for v in values],
            width,
            color=colors[side],
            label=side,
        )
    ax.axhline(1, color="red", ls="--", lw=1, label="target p99 <= 1 s")
    ax.set_yscale("log")
    ax.set_xticks(range(4), ["p50", "p95", "p99", "max"])
    ax.set_ylabel("first cancel call - (created_at + 20 s), seconds (log)")
    ax.set_title(f"Runtime lateness (max_runtime {MAX_RUNTIME_S} s)")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[2]
    all_names = [*names, "runtime"]
    for side in WATCHERS:
        xs = [i + offsets[side] for i in range(len(all_names))]
        ax.bar(xs, [classes[n][side]["status_calls"]["mean"] for n in all_names], width, color=colors[side], alpha=0.4)
        ax.bar(
            xs,
            [classes[n][side]["status_calls_before_cancel"]["mean"] for n in all_names],
            width,
            color=colors[side],
            label=f"{side} (light: after the cancel)",
        )
    for i, n in enumerate(all_names):
        entry = classes[n]["supervisor"]
        ax.annotate(
            f"{entry['status_calls_ratio']:.2f}x",
            (i + offsets["supervisor"], entry["status_calls"]["mean"]),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=7,
        )
    ax.set_xticks(range(len(all_names)), all_names)
    ax.set_ylabel("status calls per job (mean)")
    ax.set_title("Cost: status calls per job (label: supervisor / naive)")
    ax.legend(fontsize=7)

    ax = axes[3]
    paths = result["paths"]
    for side in WATCHERS:
        xs = [i + offsets[side] for i in range(len(PATHS))]
        # Past each path's own bar: overshoot past 50, a team's spend past 90, asked past 50.
        base = {"budget": BUDGET_CREDITS, "submit": PATH_LIMIT}
        values = [max(paths[p][side][PATH_TARGETS[p][0]]["max"] - base.get(p, 0), 0.1) for p in PATHS]
        ax.bar(xs, values, width, color=colors[side], label=side)
        for xi, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:g}", (xi, v), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    for i, p in enumerate(PATHS):
        bound = PATH_TARGETS[p][1] - {"budget": BUDGET_CREDITS, "submit": PATH_LIMIT}.get(p, 0)
        ax.hlines(max(bound, 0.1), i - 0.45, i + 0.45, colors="red", linestyles="--", lw=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(PATHS)), list(PATHS))
    ax.set_ylabel("worst job or team past its limit, credits (log; 0 drawn at 0.1)")
    ax.set_title("The issue's paths (max; red: target)")
    ax.legend(fontsize=7)

    m = result["machine"]
    fig.suptitle(
        f"clado-supervisor precision, poll_interval {POLL_INTERVAL_S} s - {m['nproc']} cores (shared), "
        f"Python {m['python']}, {m['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
