"""Fault injection ("Prove it"): the real daemon, as subprocesses, against the fake Clado API.

1. Crashes: SIGKILL at random (seeded) moments and restarts, on SQLite; then every runaway is
   cancelled and confirmed, no well-behaved job is touched, nothing is left non-terminal.
2. API chaos: 5xx, 429 with Retry-After, answers slower than the client timeout, garbage
   bodies and dropped connections; the daemon keeps running and still does its job.
3. Bad job ids: rejected by the CLI and the admin API before any request reaches the API.
4. Secrets: the API key, the admin token and a webhook secret appear in no log line, no CLI
   output, no HTTP answer and no metric.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import standardwebhooks
from prometheus_client.parser import text_string_to_metric_families

from conftest import config_text

from .conftest import DaemonProcess, FakeApiProcess, cli, cli_env, jobs_json, wait_for

TERMINAL = frozenset({"completed", "failed", "cancelled", "lost", "unconfirmed"})

# Every credit runaway breaches max_credits = 20 two seconds after it starts (rate 10) and
# would only complete on its own after 30 s (limit 300): a daemon that does not stop it in
# time loses it to completion, and the outcome checks see that.
RUNAWAY_POLICIES = """
[policies.default]
max_runtime = "30m"
max_credits = 20

[policies.short]
match = { kind = "short" }
max_runtime = "3s"
"""

# kind → fake-API knobs, labels, and the (state, cancel_reason, remote status) it must end in.
KINDS: dict[str, dict[str, Any]] = {
    "credits": {"knobs": {"rate": 10, "limit": 300}, "expect": ("cancelled", "max_credits", "cancelled")},
    # An accepted cancel that takes effect 1.5 s later: confirming has to keep polling.
    "delay": {
        "knobs": {"rate": 10, "limit": 300, "cancel_delay": 1.5},
        "expect": ("cancelled", "max_credits", "cancelled"),
    },
    # The first cancel loses to completion (409, then status completed): ends `completed`,
    # with the breach still recorded.
    "race": {"knobs": {"rate": 10, "limit": 300, "race": True}, "expect": ("completed", "max_credits", "completed")},
    # Slow (0.5 credit/s) but over its 3 s max_runtime (policy `short`, by label).
    "runtime": {
        "knobs": {"rate": 0.5, "limit": 300},
        "labels": ["kind=short"],
        "expect": ("cancelled", "max_runtime", "cancelled"),
    },
    # Well-behaved: 10 results in 2 s, under every limit. The race/delay knobs only matter
    # if someone cancels them, which nobody may.
    "ok": {"knobs": {"rate": 5, "limit": 10}, "expect": ("completed", None, "completed")},
    "ok-race": {"knobs": {"rate": 5, "limit": 10, "race": True}, "expect": ("completed", None, "completed")},
    "ok-delay": {"knobs": {"rate": 5, "limit": 10, "cancel_delay": 1}, "expect": ("completed", None, "completed")},
    # Well-behaved and long (15 results in 15 s): many polls, so many faults to get through.
    "ok-long": {"knobs": {"rate": 1, "limit": 15}, "expect": ("completed", None, "completed")},
}
WELL_BEHAVED = frozenset({"ok", "ok-race", "ok-delay", "ok-long"})
# The blind phase: jobs whose spend the API hides (slow, 0.5 credit/s, policy `blind`: over
# their 12 s max_runtime, counted from when they are tracked (no created_at), time for 3
# unreadable answers and more even after a slow daemon start), each ending as it must:
# (state, reason, remote status, blind reason).
BLIND_DEADLINE = 12
BLIND_POLICIES = f"""{RUNAWAY_POLICIES}
[policies.blind]
match = {{ kind = "blind" }}
max_runtime = "{BLIND_DEADLINE}s"
"""
BLIND_KINDS: dict[str, dict[str, Any]] = {
    # No count field and no alternative to count with: confirmed cancelled by its status.
    "blind-count": {
        "knobs": {"rate": 0.5, "limit": 300, "count_field": "none", "unpaged": False, "max_page_size": 1},
        "expect": ("cancelled", "max_runtime", "cancelled", "no_count"),
    },
    # No status at all: the cancel is sent at the deadline and taken, but never confirmable.
    "blind-status": {
        "knobs": {"rate": 0.5, "limit": 300, "hide_status": True},
        "expect": ("unconfirmed", "max_runtime", "cancelled", "no_status"),
    },
    # 403 on status, cancel still works: lost, and still cancelled at its deadline.
    "blind-403": {
        "knobs": {"rate": 0.5, "limit": 300, "forbidden_after": 0},
        "expect": ("lost", "max_runtime", "cancelled", "forbidden"),
    },
}
for _kind in BLIND_KINDS.values():
    _kind["labels"] = ["kind=blind"]
    _kind["knobs"]["hide_created_at"] = True
KINDS.update(BLIND_KINDS)


# -- helpers ------------------------------------------------------------------------------------

_API_DEFAULTS = 'timeout = "2s"\nmax_retries = 2'


def fi_config(
    base_url: str, *, supervisor: dict[str, str] | None = None, policies: str = "", extra: str = "", api: str = ""
) -> str:
    """tests/conftest.py's config_text, with the [api] timeout/retry lines replaced by `api`."""
    text = config_text(base_url, "sqlite:///supervisor.db", supervisor=supervisor, policies=policies, extra=extra)
    if api:
        assert _API_DEFAULTS in text, "config_text's [api] block changed: update fi_config"
        text = text.replace(_API_DEFAULTS, api)
    return text


def create_jobs(fake: FakeApiProcess, counts: dict[str, int]) -> dict[str, str]:
    """Create jobs on the fake API; returns job id → kind."""
    kinds: dict[str, str] = {}
    for kind, count in counts.items():
        if count:
            ids = fake.post("/_fake/jobs/bulk", {"count": count, **KINDS[kind]["knobs"]})["job_ids"]
            kinds.update(dict.fromkeys(ids, kind))
    return kinds


def by_labels(kinds: dict[str, str]) -> dict[tuple[str, ...], list[str]]:
    """The jobs grouped by the labels their kind is tracked with ("kind=short", …)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for job_id, kind in kinds.items():
        groups.setdefault(tuple(KINDS[kind].get("labels", ())), []).append(job_id)
    return groups


def track_cli(cwd: Path, kinds: dict[str, str], env: dict[str, str] | None = None) -> None:
    """`track --from-file -`, one call per label set."""
    for labels, ids in by_labels(kinds).items():
        args = [arg for label in labels for arg in ("--label", label)]
        result = cli("track", "--from-file", "-", *args, cwd=cwd, env=env, stdin="\n".join(ids) + "\n")
        assert result.returncode == 0, result.stderr


def track_api(api: Exchange, kinds: dict[str, str]) -> None:
    """POST /v1/jobs, one call per label set."""
    for labels, ids in by_labels(kinds).items():
        label_map = dict(label.split("=", 1) for label in labels)
        status, body = api.json("POST", "/v1/jobs", {"job_ids": ids, "labels": label_map})
        assert status == 201 and sorted(body["added"]) == sorted(ids), (status, body)


def add_jobs(
    fake: FakeApiProcess, cwd: Path, counts: dict[str, int], env: dict[str, str] | None = None
) -> dict[str, str]:
    """Create jobs on the fake API and `track` them through the CLI; returns job id → kind."""
    kinds = create_jobs(fake, counts)
    track_cli(cwd, kinds, env)
    return kinds


def db_states(cwd: Path) -> Counter[str]:
    """Jobs by state, read straight from the SQLite file (cheaper than a CLI call per look)."""
    conn = sqlite3.connect(f"file:{cwd / 'supervisor.db'}?mode=ro", uri=True, timeout=5)
    try:
        return Counter(dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()))
    finally:
        conn.close()


def all_terminal(cwd: Path, count: int) -> bool:
    states = db_states(cwd)
    return sum(states.values()) == count and all(state in TERMINAL for state in states)


def wait_for_log(daemon: DaemonProcess, text: str, *, timeout: float = 30, allow_exit: bool = False) -> bool:
    """Wait until the daemon's log holds `text`; False if it exited first (when allowed)."""

    def seen() -> bool:
        if text in daemon.log_path.read_text():
            return True
        if daemon.proc.poll() is not None:
            if allow_exit:
                return True
            raise AssertionError(
                f"the daemon exited ({daemon.proc.returncode}) before logging {text!r}:\n"
                f"{daemon.log_path.read_text()[-3000:]}"
            )
        return False

    wait_for(seen, timeout=timeout, what=f"{text!r} in the daemon's log", interval=0.02)
    return text in daemon.log_path.read_text()


def admin_port(daemon: DaemonProcess) -> int:
    """The admin API's port (the config listens on port 0: no race for a free port)."""
    wait_for_log(daemon, "admin API listening")
    for line in daemon.log_lines():
        if line.get("message") == "admin API listening":
            return int(str(line["address"]).rsplit(":", 1)[1])
    raise AssertionError("no 'admin API listening' line")


class Exchange:
    """Every HTTP answer received from the daemon, kept for the secrets grep."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token
        self.seen: list[str] = []

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | bool | None = True,
        raw_body: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request, no redirect following; `token=True` uses the configured token."""
        headers = {"Content-Type": "application/json"}
        bearer = self.token if token is True else token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            answer = (response.status, {k.lower(): v for k, v in response.getheaders()}, payload)
        finally:
            conn.close()
        self.seen.append(f"{method} {path} -> {answer[0]}\n{answer[1]}\n{payload.decode('utf-8', 'replace')}")
        return answer

    def json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        status, _, payload = self.request(method, path, body, **kwargs)
        return status, json.loads(payload) if payload else None


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def metric_sum(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **match: Any) -> float:
    """The sum of `name`'s samples whose labels satisfy `match` (a value or a predicate)."""
    total = 0.0
    for (sample, labels), value in values.items():
        if sample != name:
            continue
        label_map = dict(labels)
        if all(label_map.get(k) == v if not callable(v) else v(label_map.get(k)) for k, v in match.items()):
            total += value
    return total


def outcome_problems(cwd: Path, fake: FakeApiProcess, kinds: dict[str, str]) -> tuple[list[str], dict[str, int]]:
    """Every deviation from the expected end of each job, and the fake's cancel calls per job."""
    jobs = jobs_json(cwd)
    problems: list[str] = []
    calls: dict[str, int] = {}
    for job_id, kind in sorted(kinds.items(), key=lambda item: item[1]):
        remote = fake.job(job_id)
        calls[job_id] = remote["cancel_calls"]
        job = jobs.get(job_id)
        if job is None:
            problems.append(f"{kind} {job_id}: not tracked")
            continue
        state, reason, remote_status = KINDS[kind]["expect"]
        seen = (
            f"{kind} {job_id}: state={job['state']} reason={job['cancel_reason']} final_status="
            f"{job['final_status']} remote={remote['status']} cancel_calls={remote['cancel_calls']} "
            f"last_error={job['last_error']}"
        )
        if job["state"] not in TERMINAL:
            problems.append(f"non-terminal: {seen}")
        if (job["state"], job["cancel_reason"], remote["status"]) != (state, reason, remote_status):
            problems.append(f"expected state={state} reason={reason} remote={remote_status}; got {seen}")
        if job["final_status"] != remote["status"] or job["confirmed_at"] is None:
            problems.append(f"final status not confirmed: {seen}")
        if kind in WELL_BEHAVED:
            if remote["cancel_calls"] != 0 or job["cancel_requested_at"] is not None:
                problems.append(f"well-behaved job cancelled: {seen}")
        elif remote["cancel_calls"] < 1 or job["cancel_requested_at"] is None:
            problems.append(f"runaway without a cancel call: {seen}")
    return problems, calls


def failure_lines(*daemons: DaemonProcess) -> list[str]:
    """Log lines that only a bug produces: unexpected exceptions, a tick that raised."""
    bad_events = ("job handling failed", "tick raised", "admin API request failed")
    found = []
    for daemon in daemons:
        for line in daemon.log_lines():
            event = str(line.get("message", ""))
            if event.startswith(bad_events) or "Traceback" in event or "exception" in line:
                found.append(json.dumps(line)[:600])
    return found


# -- 1. crashes -----------------------------------------------------------------------------------

CRASH_SEED = 20260917
KILLS = 20  # SIGKILLs at random moments
FAILPOINT_AFTER = (3, 9, 15)  # after these timer kills, one daemon dies at the failpoint
CRASH_TOKEN = "adm-crash-0c5e71"


def crash_wave(index: int) -> dict[str, int]:
    """Four jobs: two runaways (one of them rotating through delay, race, runtime), two
    well-behaved (one rotating through the race/delay knobs nobody may trigger)."""
    return _merge(
        {"credits": 1, ("delay", "race", "runtime")[index % 3]: 1},
        {"ok": 1},
        {("ok", "ok-race", "ok-delay")[index % 3]: 1},
    )


def _merge(*counts: dict[str, int]) -> dict[str, int]:
    merged: Counter[str] = Counter()
    for count in counts:
        merged.update(count)
    return dict(merged)


# 24 daemon processes started one after another (about 4 s each on a busy 2-core machine,
# 100-120 s in all): the suite's 120 s hang guard is too close. Every wait inside is bounded.
@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_then_every_runaway_is_cancelled_and_confirmed(
    tmp_path: Path, fake_api: FakeApiProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 daemons SIGKILLed at seeded random moments 0.3-2 s after "supervisor started", each
    restarted; every other one gets a wave of new jobs just before it starts (tracked through
    its admin API once it listens), so decisions, cancels and confirmations are in flight when
    the kills land. Three more daemons die at the after-cancel-decision failpoint, the worst
    place: a decision committed, its cancel not sent (their waves go in through the CLI).
    Leases last 1 s, so a restarted daemon takes over what the dead one held. The last daemon
    runs until every job is terminal.

    At most 2 cancel calls per job: a second call is only needed when a daemon died between
    the call landing and the commit that records it (the fake then answers 409)."""
    (tmp_path / "supervisor.toml").write_text(
        fi_config(
            fake_api.base_url,
            supervisor={
                "lease_ttl": '"1s"',
                "tick_interval": '"200ms"',
                "poll_interval": '"1s"',
                "confirm_interval": '"200ms"',
                "confirm_timeout": '"30s"',
            },
            policies=RUNAWAY_POLICIES,
        )
    )
    rng = random.Random(CRASH_SEED)
    offsets = [round(rng.uniform(0.3, 2.0), 3) for _ in range(KILLS)]
    env = cli_env(CLADO_SUPERVISOR_TOKEN=CRASH_TOKEN)
    kinds: dict[str, str] = {}
    summary: list[str] = []
    daemons: list[DaemonProcess] = []
    started = time.monotonic()
    waves = 0

    def record(label: str, how: str, daemon: DaemonProcess) -> None:
        code = daemon.wait(timeout=10)
        if code != -signal.SIGKILL:
            raise AssertionError(
                f"daemon {label} exited on its own with {code}:\n{daemon.log_path.read_text()[-3000:]}"
            )
        states = db_states(tmp_path)
        summary.append(
            f"{label:>6}: t={time.monotonic() - started:5.1f}s {how:22s} "
            f"cancel calls so far={fake_api.get('/_fake/stats')['cancel']:3d} "
            f"states={dict(sorted(states.items()))}"
        )

    for cycle, offset in enumerate(offsets):
        wave = create_jobs(fake_api, crash_wave(waves)) if cycle % 2 == 0 else {}
        waves += bool(wave)
        kinds.update(wave)
        daemon = DaemonProcess(tmp_path, env)
        daemons.append(daemon)
        try:
            wait_for_log(daemon, "supervisor started", timeout=30)
            deadline = time.monotonic() + offset
            if wave:
                track_api(Exchange(admin_port(daemon), CRASH_TOKEN), wave)
            # The kill moment itself is the variable: sleep until it.
            time.sleep(max(0.0, deadline - time.monotonic()))
            late = time.monotonic() - deadline
            assert daemon.proc.poll() is None, (
                f"daemon {cycle} exited on its own:\n{daemon.log_path.read_text()[-3000:]}"
            )
            daemon.proc.send_signal(signal.SIGKILL)
        except BaseException:
            daemon.stop(signal.SIGKILL)
            raise
        record(f"{cycle}", f"timer +{offset:.3f}s" + (f" ({late:.2f}s late)" if late > 0.05 else ""), daemon)

        if cycle in FAILPOINT_AFTER:
            wave = create_jobs(fake_api, _merge(crash_wave(waves), {"credits": 2}))
            waves += 1
            kinds.update(wave)
            track_cli(tmp_path, wave)
            dying = DaemonProcess(tmp_path, cli_env(CLADO_SUPERVISOR_FAILPOINT="after-cancel-decision"))
            daemons.append(dying)
            try:
                wait_for(
                    lambda proc=dying.proc: proc.poll() is not None,
                    timeout=30,
                    what="the daemon to die at the after-cancel-decision failpoint",
                )
            except BaseException:
                dying.stop(signal.SIGKILL)
                raise
            record(f"fp{cycle}", "failpoint", dying)

    final = DaemonProcess(tmp_path)
    daemons.append(final)
    try:
        # Its signal handlers are installed by then (a SIGTERM during start-up kills it).
        wait_for_log(final, "supervisor started", timeout=30)
        wait_for(
            lambda: all_terminal(tmp_path, len(kinds)),
            timeout=45,
            what=f"all jobs terminal after the kills: {dict(db_states(tmp_path))}",
        )
        assert final.proc.poll() is None, "the last daemon exited on its own"
    finally:
        code = final.stop(signal.SIGTERM)
    with capsys.disabled():  # the kill moments, on the terminal even without -s
        print(
            "\n".join(
                [
                    "",
                    f"crash test (seed {CRASH_SEED}): {len(kinds)} jobs {dict(Counter(kinds.values()))}",
                    *summary,
                    f"final daemon stopped with {code} after {time.monotonic() - started:.1f}s",
                ]
            )
        )
    assert code == 0

    problems, calls = outcome_problems(tmp_path, fake_api, kinds)
    assert not problems, "\n".join(["", *problems, "kills:", *summary])
    too_many = {job_id: n for job_id, n in calls.items() if n > 2}
    assert not too_many, f"more than 2 cancel calls: {too_many}"
    assert not failure_lines(*daemons), "\n".join(failure_lines(*daemons))


# -- 2. API chaos -------------------------------------------------------------------------------

CHAOS = {
    "error_rate": 0.20,
    "throttle_rate": 0.05,
    "retry_after": 1,
    "slow_rate": 0.05,
    "slow_seconds": 2,
    "garbage_rate": 0.02,
    "drop_rate": 0.02,
    "seed": 1234,
}
CHAOS_JOBS = {"credits": 8, "delay": 2, "race": 2, "runtime": 2, "ok": 6, "ok-race": 1, "ok-delay": 1, "ok-long": 16}


def test_api_chaos_the_daemon_survives_and_still_cancels_every_runaway(
    tmp_path: Path, fake_api: FakeApiProcess
) -> None:
    """20 % 5xx, 5 % 429 (Retry-After: 1), 5 % answers 2 s late against a 1 s client timeout,
    2 % garbage bodies, 2 % connections dropped mid-response, on every real endpoint.

    Cancel calls: a cancel whose answer was lost (a dropped connection, or a slow answer past
    the client timeout: both are handled by the API) may have landed, so the daemon sends it
    again and the API counts two calls (the second one 409). Usually that is at most 2 per
    job, but two lost answers in a row for one job are legitimate too (about 0.3 % per job at
    these rates), so the exact bound is checked: every call beyond the first of a job is
    explained by one cancel answer the daemon never got (`api_requests_total{endpoint="cancel",
    status="error"}`)."""
    (tmp_path / "supervisor.toml").write_text(
        fi_config(
            fake_api.base_url,
            supervisor={"confirm_timeout": '"30s"', "lease_ttl": '"10s"'},
            policies=RUNAWAY_POLICIES,
            api='timeout = "1s"\nmax_retries = 3',
        )
    )
    kinds = add_jobs(fake_api, tmp_path, CHAOS_JOBS)
    faults = fake_api.post("/_fake/faults", CHAOS)
    assert faults["error_rate"] == 0.2 and faults["drop_rate"] == 0.02
    daemon = DaemonProcess(tmp_path)
    try:
        port = admin_port(daemon)
        wait_for(
            lambda: all_terminal(tmp_path, len(kinds)),
            timeout=60,
            what=f"all jobs terminal under API chaos: {dict(db_states(tmp_path))}",
        )
        assert daemon.proc.poll() is None, f"the daemon exited under chaos:\n{daemon.log_path.read_text()[-3000:]}"
        status, _, body = Exchange(port).request("GET", "/metrics")
        assert status == 200
        values = metric_values(body.decode())
        stats = fake_api.get("/_fake/stats")
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, f"SIGTERM exit code {code}"

    problems, calls = outcome_problems(tmp_path, fake_api, kinds)
    assert not problems, "\n".join(["", *problems])

    retries = metric_sum(values, "clado_supervisor_api_retries_total")
    requests = "clado_supervisor_api_requests_total"
    server_errors = metric_sum(values, requests, status=lambda s: s is not None and s.startswith("5"))
    throttled = metric_sum(values, requests, status="429")
    errors = metric_sum(values, requests, status="error")  # timeouts and dropped connections
    print(
        f"\nchaos: fake stats {stats}; retries {retries}, 5xx {server_errors}, 429 {throttled}, "
        f"errors {errors}; cancel calls {sorted(Counter(calls.values()).items())}"
    )
    for job_id, n in calls.items():
        if n > 1:
            remote = fake_api.job(job_id)
            shown = json.loads(cli("jobs", "show", job_id, "--json", cwd=tmp_path).stdout)
            print(
                f"  {kinds[job_id]} {job_id}: {n} cancel calls at {remote['cancel_call_times']}, "
                f"created {remote['created_at_ts']}; events: "
                + "; ".join(f"{e['at']} {e['kind']} {e['to_state'] or ''} {e['detail']}" for e in shown["events"])
            )
    assert stats["faults_injected"] > 0
    assert retries > 0
    assert server_errors > 0 and throttled > 0 and errors > 0, (server_errors, throttled, errors)

    lost_cancel_answers = metric_sum(values, requests, endpoint="cancel", status="error")
    extra_calls = sum(n - 1 for n in calls.values() if n > 1)
    assert extra_calls <= lost_cancel_answers, (
        f"{extra_calls} repeated cancel calls but only {lost_cancel_answers} cancel answers lost: {calls}"
    )
    assert all(n <= 1 + lost_cancel_answers for n in calls.values())
    assert not failure_lines(daemon), "\n".join(failure_lines(daemon))


def test_api_chaos_with_a_blind_phase_deadlines_still_cancel_blind_jobs(
    tmp_path: Path, fake_api: FakeApiProcess
) -> None:
    """The chaos above, with jobs whose spend the API hides (no count, no status, 403 on
    status): each is reported blind, and still cancelled at its runtime deadline (never before
    it) while the credit runaways and well-behaved jobs end as they must."""
    (tmp_path / "supervisor.toml").write_text(
        fi_config(
            fake_api.base_url,
            supervisor={"confirm_timeout": '"8s"', "lease_ttl": '"10s"'},
            policies=BLIND_POLICIES,
            api='timeout = "1s"\nmax_retries = 3',
        )
    )
    counts = {"credits": 3, "runtime": 1, "ok": 3, "ok-long": 4, **dict.fromkeys(BLIND_KINDS, 3)}
    kinds = add_jobs(fake_api, tmp_path, counts)
    fake_api.post("/_fake/faults", CHAOS)
    daemon = DaemonProcess(tmp_path)
    try:
        wait_for(
            lambda: all_terminal(tmp_path, len(kinds)),
            timeout=90,
            what=f"all jobs terminal under API chaos with blind jobs: {dict(db_states(tmp_path))}",
        )
        assert daemon.proc.poll() is None, f"the daemon exited:\n{daemon.log_path.read_text()[-3000:]}"
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, f"SIGTERM exit code {code}"

    seeing = {job_id: kind for job_id, kind in kinds.items() if kind not in BLIND_KINDS}
    problems, _calls = outcome_problems(tmp_path, fake_api, seeing)
    jobs = jobs_json(tmp_path)
    for job_id, kind in sorted(kinds.items(), key=lambda item: item[1]):
        if kind not in BLIND_KINDS:
            continue
        job, remote = jobs[job_id], fake_api.job(job_id)
        state, reason, remote_status, blind = BLIND_KINDS[kind]["expect"]
        seen = (
            f"{kind} {job_id}: state={job['state']} reason={job['cancel_reason']} blind={job['blind']} "
            f"remote={remote['status']} cancel_calls={remote['cancel_calls']} last_error={job['last_error']}"
        )
        if (job["state"], job["cancel_reason"], remote["status"], job["blind"]) != (
            state,
            reason,
            remote_status,
            blind,
        ):
            shown = json.loads(cli("jobs", "show", job_id, "--json", cwd=tmp_path).stdout)
            history = "; ".join(f"{e['kind']} {e['reason'] or ''} {e['detail']}" for e in shown["events"])
            problems.append(f"expected {BLIND_KINDS[kind]['expect']}; got {seen}; events: {history}")
        sent = remote["cancel_call_times"]
        tracked = datetime.fromisoformat(job["submitted_at"]).timestamp()
        if not sent or sent[0] < tracked + BLIND_DEADLINE:
            problems.append(f"cancel not sent at (or after) the {BLIND_DEADLINE} s deadline: {sent}; {seen}")
    assert not problems, "\n".join(["", *problems])
    assert not failure_lines(daemon), "\n".join(failure_lines(daemon))


# -- 3. bad job ids ---------------------------------------------------------------------------------

EVIL_IDS = {
    "empty": "",
    "too long (129)": "a" * 129,
    "dot-dot-slash": "../",
    "dot-dot-slash path": "../../api/credits",
    "encoded dot-dot-slash": "..%2f",
    "space": "job 1",
    "SOH control": "job\x011",
    "ESC sequence": "job\x1b[31m",
    "newline (forged log line)": "job-1\nINFO forged",
    "cyrillic o look-alike": "j\u043eb-1",
    "fullwidth digits": "job-\uff11\uff12",
    "leading dash": "-job-1",
}
ADMIN_TOKEN_IDS = "adm-ids-6b0e4c1f"


def _validator_rejected(result: Any, what: str) -> None:
    assert result.returncode == 2, (what, result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, (what, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid job id" in lines[0], (what, result.stderr)
    assert result.stdout == "", (what, result.stdout)


def test_bad_job_ids_are_rejected_before_any_request(tmp_path: Path, fake_api: FakeApiProcess) -> None:
    (tmp_path / "supervisor.toml").write_text(fi_config(fake_api.base_url))
    before = fake_api.get("/_fake/stats")

    # The CLI: exit 2 and one line naming the problem, for every command that takes an id
    # (run a few at a time: each is a Python start-up).
    calls: list[tuple[str, tuple[str, ...], str | None]] = []
    for name, evil in EVIL_IDS.items():
        calls += [
            (f"track {name}", ("track", "good-id-1", "--", evil), None),
            (f"jobs show {name}", ("jobs", "show", "--", evil), None),
            (f"cancel {name}", ("cancel", "--", evil), None),
        ]
    # A line of a file (stdin) goes through the same check.
    calls.append(
        ("track --from-file", ("track", "--from-file", "-"), f"good-id-2\n{EVIL_IDS['cyrillic o look-alike']}\n")
    )
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda call: cli(*call[1], cwd=tmp_path, stdin=call[2]), calls))
    for (what, _, _), result in zip(calls, results, strict=True):
        _validator_rejected(result, what)
    # Without `--`, a leading '-' is an unknown option: still a usage error, exit 2.
    for command in (["track"], ["jobs", "show"], ["cancel"]):
        result = cli(*command, EVIL_IDS["leading dash"], cwd=tmp_path)
        assert result.returncode == 2 and "No such option" in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr
    # A well-formed id that is not tracked gets the other answer: the validator is not
    # simply refusing everything.
    unknown = cli("jobs", "show", "a" * 128, cwd=tmp_path)
    assert unknown.returncode == 2 and "is not tracked" in unknown.stderr, unknown.stderr
    assert jobs_json(tmp_path) == {}, "a bad id (or the good id beside it) was written"

    # The admin API, on the running daemon: 4xx for every route that takes an id.
    daemon = DaemonProcess(tmp_path, cli_env(CLADO_SUPERVISOR_TOKEN=ADMIN_TOKEN_IDS))
    try:
        api = Exchange(admin_port(daemon), ADMIN_TOKEN_IDS)
        for name, evil in EVIL_IDS.items():
            status, body = api.json("POST", "/v1/jobs", {"job_ids": [evil]})
            assert status == 422 and body["error"] == "invalid_request", (name, status, body)
            status, body = api.json("POST", "/v1/jobs", {"job_ids": ["good-id-3", evil]})
            assert status == 422, (name, status, body)
            path = quote(evil, safe="")
            status, headers, payload = api.request("GET", f"/v1/jobs/{path}")
            if evil == "":
                # /v1/jobs/ is the collection, not a job: redirected to /v1/jobs, never a job lookup.
                assert status in (307, 404) or 400 <= status < 500, (name, status, payload)
            elif 300 <= status < 400:
                # Starlette redirects a path ending in '/' (".." + "/") to the path without it;
                # the id there is still refused.
                location = headers["location"]
                assert location.startswith(f"http://127.0.0.1:{api.port}/v1/jobs/"), location
                status, headers, payload = api.request("GET", location.split(str(api.port), 1)[1])
                assert 400 <= status < 500, (name, status, payload)
            else:
                assert 400 <= status < 500, (name, status, payload)
            status, _, payload = api.request("POST", f"/v1/jobs/{path}/cancel", {"reason": "evil"})
            assert 400 <= status < 500, (name, status, payload)
            assert b"Traceback" not in payload
        status, body = api.json("GET", "/v1/jobs/" + "a" * 128)
        assert (status, body["error"]) == (404, "job_not_found"), body
        status, body = api.json("GET", "/v1/jobs")
        assert (status, body) == (200, {"jobs": [], "next_cursor": None}), body
    finally:
        assert daemon.stop(signal.SIGTERM) == 0

    after = fake_api.get("/_fake/stats")
    for endpoint in ("status", "cancel", "initiate"):
        assert after[endpoint] == before[endpoint], (endpoint, before, after)
    assert jobs_json(tmp_path) == {}


# -- 4. secrets -------------------------------------------------------------------------------------

SECRET_API_KEY = "lk_SECRET_apikey_7f3a9c"
SECRET_TOKEN = "tok_SECRET_admin_51be"
SECRET_HOOK = "whsec_SECRET_hook_c08d"
# The values, their distinctive middles, and their prefixes (a truncated secret is a leak too).
NEEDLES = (
    SECRET_API_KEY,
    SECRET_TOKEN,
    SECRET_HOOK,
    "SECRET_apikey",
    "SECRET_admin",
    "SECRET_hook",
    "lk_SECRET",
    "tok_SECRET",
    "whsec_SECRET",
)
HOOK_SECRET_ENV = "CLADO_SUPERVISOR_WEBHOOK_SECRET"


class HookReceiver:
    """A local webhook endpoint that records every delivery (headers and body)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[str]:
        return [json.loads(body)["event"] for _, body in self.deliveries]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[HookReceiver]:
    receiver = HookReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


def _secret_env(key_source: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLADO_")}
    env.update(PYTHONUNBUFFERED="1", CLADO_SUPERVISOR_TOKEN=SECRET_TOKEN, **{HOOK_SECRET_ENV: SECRET_HOOK})
    if key_source == "env":
        env["CLADO_API_KEY"] = SECRET_API_KEY
    return env


@pytest.mark.parametrize("key_source", ["api_key_file", "env"])
def test_secrets_never_appear_in_logs_outputs_answers_or_metrics(
    tmp_path: Path, fake_api: FakeApiProcess, hooks: HookReceiver, key_source: str
) -> None:
    api_lines = 'timeout = "2s"\nmax_retries = 2'
    if key_source == "api_key_file":
        key_file = tmp_path / "secrets" / "clado-api-key"
        key_file.parent.mkdir()
        key_file.touch(mode=0o600)
        key_file.chmod(0o600)
        key_file.write_text(SECRET_API_KEY + "\n")
        api_lines += f'\napi_key_file = "{key_file}"'
    config = fi_config(
        fake_api.base_url,
        supervisor={"poll_interval": '"500ms"'},
        policies='[policies.default]\nmax_runtime = "30m"\nmax_credits = 20',
        api=api_lines,
        extra=f'\n[[notify.webhooks]]\nurl = "{hooks.url}"\nsecret_env = "{HOOK_SECRET_ENV}"\n',
    )
    (tmp_path / "supervisor.toml").write_text(config)
    env = _secret_env(key_source)
    outputs: list[str] = []

    def run(*args: str, code: int = 0, stdin: str | None = None) -> str:
        result = cli(*args, cwd=tmp_path, env=env, stdin=stdin)
        outputs.append(f"$ {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
        assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
        return result.stdout

    # Only the secret key works: whatever succeeds below used it.
    fake_api.post("/_fake/keys", {"keys": [SECRET_API_KEY]})
    daemon = DaemonProcess(tmp_path, env)
    api = None
    try:
        api = Exchange(admin_port(daemon), SECRET_TOKEN)
        # A submit through the supervisor would be capped at max_credits: this runaway was
        # started elsewhere, and is only tracked.
        runaway = fake_api.create_job(query="runaway", rate=10, limit=300)
        run("track", runaway, "--label", "team=growth")
        run("submit", "a capped one", "--limit", "300", "--label", "team=growth")
        well_behaved = fake_api.create_job(rate=5, limit=10)
        sleeper = fake_api.create_job(rate=1, limit=1000)  # polled throughout, for the key rejection
        run("track", well_behaved, "--label", "team=search")
        run("track", sleeper, "--max-credits", "100000")
        manual = fake_api.create_job(rate=1, limit=1000)
        status, body = api.json("POST", "/v1/jobs", {"job_ids": [manual], "labels": {"team": "ops"}})
        assert status == 201, body

        def state(job_id: str) -> str:
            status, body = api.json("GET", f"/v1/jobs/{job_id}")
            assert status == 200, body
            return str(body["state"])

        wait_for(lambda: state(runaway) == "cancelled", timeout=30, what="the runaway cancelled", interval=0.3)
        status, body = api.json("POST", f"/v1/jobs/{manual}/cancel", {"reason": "no longer needed"})
        assert status == 200 and body["cancel_reason"] == "manual", body
        wait_for(lambda: state(well_behaved) == "completed", timeout=30, what="the well-behaved job completed")

        # The admin API: right token, wrong tokens (one that looks like the real one), none.
        assert api.request("GET", "/v1/jobs")[0] == 200
        assert api.request("GET", f"/v1/jobs/{runaway}")[0] == 200
        for wrong in ("tok_SECRET_admin_wrong", SECRET_TOKEN[:-1], SECRET_API_KEY, None):
            status, _, payload = api.request("GET", "/v1/jobs", token=wrong)
            assert status == 401, (status, payload)
            assert api.request("POST", f"/v1/jobs/{sleeper}/cancel", {}, token=wrong)[0] == 401
        for path in ("/metrics", "/openapi.json", "/healthz", "/readyz"):
            assert api.request("GET", path)[0] == 200, path

        shown = json.loads(run("jobs", "show", runaway, "--json"))
        assert shown["state"] == "cancelled" and shown["cancel_reason"] == "max_credits"
        run("jobs", "show", runaway)
        run("jobs", "list")
        run("jobs", "list", "--json")
        report = json.loads(run("report", "--json"))
        assert report["cancels_by_reason"].get("max_credits", 0) >= 1, report
        run("report")
        run("check-config")

        # The API key rejected mid-run: the daemon logs it (and tells the webhook), a CLI
        # submit fails with exit 1. Then the key is accepted again.
        fake_api.post("/_fake/keys", {"keys": ["lk_other"]})
        wait_for_log(daemon, "API key rejected", timeout=20)
        run("submit", "while rejected", "--limit", "5", code=1)
        wait_for(lambda: "api_key_rejected" in hooks.events(), timeout=15, what="the api_key_rejected webhook")
        fake_api.post("/_fake/keys", {"keys": [SECRET_API_KEY]})
        run("submit", "after the key is back", "--limit", "5")

        # Config errors: the key pasted where it does not belong is not echoed back.
        bad = tmp_path / "bad.toml"
        bad.write_text(config.replace("[api]\n", f'[api]\napi_key = "{SECRET_API_KEY}"\n', 1))
        run("--config", str(bad), "check-config", code=2)
        run("--config", str(bad), "jobs", "list", code=2)
        (tmp_path / "bad-token.toml").write_text(config.replace("[http]\n", f'[http]\ntoken = "{SECRET_TOKEN}"\n', 1))
        run("--config", str(tmp_path / "bad-token.toml"), "check-config", code=2)

        status, _, metrics_body = api.request("GET", "/metrics")
        assert status == 200
        assert (
            metric_sum(metric_values(metrics_body.decode()), "clado_supervisor_api_requests_total", status="401") >= 1
        )
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0

    # Webhooks: signed with the secret (so it was read), never carrying it.
    assert {"cancel_requested", "cancelled", "api_key_rejected"} <= set(hooks.events()), hooks.events()
    for headers, body in hooks.deliveries:
        standardwebhooks.Webhook(SECRET_HOOK.encode()).verify(body, headers)  # raises if not signed with it

    haystacks = {
        "daemon log": daemon.log_path.read_text(errors="replace"),
        "CLI output": "\n".join(outputs),
        "admin API answers": "\n".join(api.seen if api else []),
        "webhook deliveries": "\n".join(f"{h}\n{b.decode('utf-8', 'replace')}" for h, b in hooks.deliveries),
    }
    for suffix in ("", "-wal", "-shm"):
        db_file = tmp_path / f"supervisor.db{suffix}"
        if db_file.exists():
            haystacks[f"database file {db_file.name}"] = db_file.read_bytes().decode("latin-1")
    assert "API key rejected" in haystacks["daemon log"]
    # The log redacts registered secrets as a last line of defence; if it ever had to, some
    # code path tried to log one.
    assert "[REDACTED]" not in haystacks["daemon log"], "a secret reached the logger (and was redacted)"
    leaks = [f"{needle!r} in {where}" for where, text in haystacks.items() for needle in NEEDLES if needle in text]
    assert not leaks, leaks


# -- secret hygiene at the edges ---------------------------------------------------------------


def test_an_api_key_pasted_into_api_key_env_is_not_echoed(tmp_path: Path, fake_api: FakeApiProcess) -> None:
    (tmp_path / "supervisor.toml").write_text(
        fi_config(fake_api.base_url, api=f'timeout = "2s"\nmax_retries = 2\napi_key_env = "{SECRET_API_KEY}"')
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLADO_")}
    for args in (("submit", "a query"), ("run",)):
        result = cli(*args, cwd=tmp_path, env=env, timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        assert "api.api_key_env" in result.stderr, result.stderr
        assert not [needle for needle in NEEDLES if needle in result.stdout + result.stderr], result.stderr


def test_a_webhook_configured_with_a_secret_is_never_sent_unsigned(
    tmp_path: Path, fake_api: FakeApiProcess, hooks: HookReceiver
) -> None:
    (tmp_path / "supervisor.toml").write_text(
        fi_config(
            fake_api.base_url,
            policies='[policies.default]\nmax_runtime = "30m"\nmax_credits = 5',
            extra=f'\n[[notify.webhooks]]\nurl = "{hooks.url}"\nsecret_env = "{HOOK_SECRET_ENV}"\n',
        )
    )
    job_id = fake_api.create_job(rate=10, limit=300)
    assert cli("track", job_id, cwd=tmp_path).returncode == 0
    daemon = DaemonProcess(tmp_path)  # HOOK_SECRET_ENV is not set (cli_env drops CLADO_*)
    try:
        # Failing closed (refusing to start, exit 2) is fine; so is signing. Sending unsigned is not.
        wait_for(
            lambda: daemon.proc.poll() is not None or hooks.deliveries,
            timeout=30,
            what="the daemon to refuse the config or deliver a webhook",
        )
    finally:
        code = daemon.stop(signal.SIGTERM)
    if not hooks.deliveries:
        assert code == 2 and "secret" in daemon.log_path.read_text(), daemon.log_path.read_text()[-2000:]
    for headers, _ in hooks.deliveries:
        assert "webhook-signature" in headers, headers
