"""A daemon killed between committing a cancel decision and sending it finishes the
cancel after a restart: the decision was in the database before the call."""

from __future__ import annotations

import signal
from pathlib import Path

from conftest import config_text

from .conftest import DaemonProcess, FakeApiProcess, cli, cli_env, jobs_json, wait_for


def test_sigkill_after_decision_then_restart_completes_the_cancel(tmp_path: Path, fake_api: FakeApiProcess) -> None:
    (tmp_path / "supervisor.toml").write_text(
        config_text(
            fake_api.base_url,
            "sqlite:///supervisor.db",
            supervisor={"lease_ttl": '"2s"'},
            policies="[policies.default]\nmax_credits = 20",
        )
    )
    job_id = fake_api.create_job(rate=10, limit=500)
    assert cli("track", job_id, cwd=tmp_path).returncode == 0

    crashing = DaemonProcess(tmp_path, cli_env(CLADO_SUPERVISOR_FAILPOINT="after-cancel-decision"))
    assert crashing.wait(timeout=60) == -signal.SIGKILL

    job = jobs_json(tmp_path)[job_id]
    assert job["state"] == "cancelling"
    assert job["cancel_reason"] == "max_credits"
    assert job["cancel_requested_at"] is not None
    assert fake_api.job(job_id)["cancel_calls"] == 0  # killed before the call

    restarted = DaemonProcess(tmp_path)
    try:
        final = wait_for(
            lambda: (j := jobs_json(tmp_path)[job_id])["state"] == "cancelled" and j,
            timeout=40,
            what="the restarted daemon to cancel and confirm",
        )
    finally:
        assert restarted.stop(signal.SIGTERM) == 0
    assert final["final_status"] == "cancelled"
    assert final["confirmed_at"] is not None
    assert fake_api.job(job_id)["cancel_calls"] == 1
    assert fake_api.job(job_id)["status"] == "cancelled"
