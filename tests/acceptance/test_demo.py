"""`clado-supervisor demo` as a user runs it: no API key, no config, nothing left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# Planted in the environment: the simulator rejects it (no "lk_" prefix), so the demo only
# passes if it uses its own key, never the user's.
USER_KEY = "sk_users_real_key_7c1e9b"


def test_demo_runs_with_no_setup_and_reports_what_the_supervisor_did(tmp_path: Path) -> None:
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLADO_")}
    # TMPDIR: the demo's temporary directory and its kept log land where the test can see them.
    env.update(PYTHONUNBUFFERED="1", TMPDIR=str(tmp))

    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "demo", "--speed", "3"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())  # the summary's sentences wrap at the console width
    assert "Traceback" not in out + result.stderr
    assert result.stderr == ""  # the daemon's logs go to the log file, never to the terminal

    assert (
        "7 runaways cancelled (budget:research-daily: 2, max_credits: 3, max_runtime: 1, stall_timeout: 1), "
        "one cancel call each." in out
    )
    assert "1 cancelled by someone else (external)" in out
    # A cancel that lost the race is answered as the API does: 200, success: false.
    assert "completed before the max_credits cancel landed (the API answered success: false" in out
    assert "Every final state confirmed by a status poll: 16 of 16 jobs" in out
    assert "matches the simulator's bill for 16 of 16" in out
    # A submission queued behind the spent hourly budget, started by the daemon when the hour turns.
    queued = re.search(r"queued for the hour queued: budget ops-hourly spent 30/30 this hour, starts at 12:00:00", out)
    started = re.search(
        r"queued for the hour started at 12:00:\d\d UTC, as the hour turned, after [\d.]+s in the queue; "
        r"the daemon tracks job ([0-9a-f]{8})",
        out,
    )
    assert queued is not None and started is not None, out
    assert queued.start() < started.start()
    assert re.search(rf"{started.group(1)} queued for the hour default completed", out), out  # tracked to the end
    assert re.search(r"1 submission waited in the queue behind budget ops-hourly \(spent 30/30 this hour\); "
                     r"the daemon started it when the hour turned, [\d.]+s later\.", out), out  # fmt: skip
    # Prevention first: the submissions over max_credits (500 and 300 asked, 60 each allowed).
    flowing = " ".join(out.split())  # the summary wraps at the terminal's width
    # A completed job continued by someone else is reopened and stopped at its limit.
    assert "reopened: running again after it was completed (someone continued it)" in flowing
    assert re.search(r"console http://127\.0\.0\.1:\d+/ui \(admin token [0-9a-f]{32}, this run only\)", flowing)
    assert "2 submission(s) capped at the source: the API was asked for 120 of the 800" in flowing
    observe = re.search(
        r"The observe-mode rule \(policies.shadow, max_credits 20\) would have cancelled 1 job\(s\); "
        r"it only recorded that, and switched on it would have saved ([\d,]+) more credits",
        out,
    )
    assert observe is not None, out
    assert int(observe.group(1).replace(",", "")) > 0
    saved = re.search(r"saved ([\d,]+) credits \(\$([\d,.]+) at \$0.01/credit\)", out)
    assert saved is not None, out
    assert int(saved.group(1).replace(",", "")) > 0
    assert "✓ Every job ended as it was built to" in out
    assert "✗" not in out

    # Nothing left behind but the log the summary points to, which holds the daemon's decisions.
    assert list(cwd.iterdir()) == []
    [log] = list(tmp.iterdir())
    assert log.suffix == ".log" and str(log) in "".join(out.split())  # however the line wraps
    log_text = log.read_text()
    # Every decision is logged alike, whoever made it: 4 runaways, the job someone continued,
    # the cancel that lost the race, and the 2 jobs the team budget stopped.
    assert log_text.count('"cancelling runaway job"') == 8
    assert "lk_" not in out + log_text


def test_demo_never_uses_or_prints_the_users_api_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLADO_")}
    env.update(CLADO_API_KEY=USER_KEY, TMPDIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "demo", "--speed", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [log] = list(tmp_path.glob("*.log"))
    assert USER_KEY not in result.stdout + result.stderr + log.read_text()
