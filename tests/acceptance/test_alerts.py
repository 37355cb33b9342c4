"""deploy/alerts.yaml, checked by Prometheus's own tool: the rules parse (`promtool check
rules`), each alert fires on the series it is about and stays quiet otherwise (`promtool test
rules`), every metric a rule names is one the daemon exports, and a real scrape of a running
daemon's /metrics passes `promtool check metrics`.

promtool ships in Debian's `prometheus` package (.ci/run installs it); without it these skip."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import config_text
from fakeserver import free_port
from supervisor.adapters import metrics

from .conftest import DaemonProcess, FakeApiProcess, cli, wait_for

RULES = Path(__file__).resolve().parents[2] / "deploy" / "alerts.yaml"
ALERTS = {
    "CladoSupervisorApiKeyRejected", "CladoSupervisorUnconfirmedCancels", "CladoSupervisorBudgetExhausted",
    "CladoSupervisorPollLag", "CladoSupervisorNoTick", "CladoSupervisorApiErrors", "CladoSupervisorJobsBlind",
    "CladoSupervisorApiDrift", "CladoSupervisorWebhookBacklog",
}  # fmt: skip


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (apt-get install -y prometheus, Debian's package ships it)")
    return tool


def run(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def rules() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}


def test_the_rules_pass_promtool_check() -> None:
    result = run(promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout
    assert set(rules()) == ALERTS


def test_every_metric_a_rule_names_is_exported() -> None:
    exported: set[str] = set()
    for family in metrics.REGISTRY.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        exported |= {family.name + suffix for suffix in suffixes}
    for name, rule in rules().items():
        used = set(re.findall(r"\bclado_supervisor_[a-z_]+", rule["expr"]))
        assert used, name
        assert used <= exported, (name, used - exported)


def _case(alert: str, summary: str, **labels: str) -> dict[str, Any]:
    """An expected firing alert, with the rule's own description (one template filled in)."""
    description = rules()[alert]["annotations"]["description"].replace("{{ $value | humanize }}", "5")
    return {"exp_labels": labels, "exp_annotations": {"summary": summary, "description": description}}


def test_each_alert_fires_on_its_series_and_not_otherwise(tmp_path: Path) -> None:
    tool = promtool()
    tests = [
        {  # 401s on one replica; the other only sees 200s.
            "interval": "1m",
            "input_series": [
                {"series": 'clado_supervisor_api_requests_total{endpoint="status",status="401",instance="a"}',
                 "values": "0+1x10"},
                {"series": 'clado_supervisor_api_requests_total{endpoint="status",status="200",instance="b"}',
                 "values": "0+50x10"},
            ],
            "alert_rule_test": [
                {"eval_time": "6m", "alertname": "CladoSupervisorApiKeyRejected", "exp_alerts": [
                    _case("CladoSupervisorApiKeyRejected", "The Clado API rejects the supervisor's API key (a)",
                          severity="critical", instance="a"),
                ]},
                {"eval_time": "6m", "alertname": "CladoSupervisorApiErrors", "exp_alerts": []},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": 'clado_supervisor_jobs{state="unconfirmed",instance="a"}', "values": "0 0 2 2"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "CladoSupervisorUnconfirmedCancels", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "CladoSupervisorUnconfirmedCancels", "exp_alerts": [
                    _case("CladoSupervisorUnconfirmedCancels", "2 cancelled job(s) never confirmed stopped",
                          severity="warning"),
                ]},
            ],
        },
        {  # growth: 90 spent + 10 reserved of 100; ops has room.
            "interval": "1m",
            "input_series": [
                {"series": 'clado_supervisor_budget_spent_credits{budget="growth"}', "values": "90x5"},
                {"series": 'clado_supervisor_budget_reserved_credits{budget="growth"}', "values": "10x5"},
                {"series": 'clado_supervisor_budget_limit_credits{budget="growth"}', "values": "100x5"},
                {"series": 'clado_supervisor_budget_spent_credits{budget="ops"}', "values": "10x5"},
                {"series": 'clado_supervisor_budget_reserved_credits{budget="ops"}', "values": "0x5"},
                {"series": 'clado_supervisor_budget_limit_credits{budget="ops"}', "values": "100x5"},
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "CladoSupervisorBudgetExhausted", "exp_alerts": [
                    _case("CladoSupervisorBudgetExhausted", "Budget growth is exhausted for this period",
                          severity="warning", budget="growth"),
                ]},
            ],
        },
        {  # Every job handled between 15 s and 60 s late: p95 = 15 + 45 × 0.95 = 57.75 s.
            "interval": "1m",
            "input_series": [
                {"series": 'clado_supervisor_poll_lag_seconds_bucket{le="15",instance="a"}', "values": "0x30"},
                {"series": 'clado_supervisor_poll_lag_seconds_bucket{le="60",instance="a"}', "values": "0+10x30"},
                {"series": 'clado_supervisor_poll_lag_seconds_bucket{le="+Inf",instance="a"}', "values": "0+10x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "CladoSupervisorPollLag", "exp_alerts": []},  # pending (for: 10m)
                {"eval_time": "15m", "alertname": "CladoSupervisorPollLag", "exp_alerts": [
                    _case("CladoSupervisorPollLag", "Jobs are handled 57.75s late (p95, a)",
                          severity="warning", instance="a"),
                ]},
            ],
        },
        {  # a: stuck at its tick of t = 60 s; b: ticks every minute.
            "interval": "1m",
            "input_series": [
                {"series": 'clado_supervisor_last_tick_timestamp_seconds{instance="a"}', "values": "60x20"},
                {"series": 'clado_supervisor_last_tick_timestamp_seconds{instance="b"}', "values": "0+60x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "CladoSupervisorNoTick", "exp_alerts": [
                    _case("CladoSupervisorNoTick", "No scheduler tick for 9m 0s (a)",
                          severity="critical", instance="a"),
                ]},
            ],
        },
        {  # 30 % of requests answered 503, for longer than the rule's 10 minutes.
            "interval": "1m",
            "input_series": [
                {"series": 'clado_supervisor_api_requests_total{endpoint="status",status="503",instance="a"}',
                 "values": "0+3x30"},
                {"series": 'clado_supervisor_api_requests_total{endpoint="status",status="200",instance="a"}',
                 "values": "0+7x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "CladoSupervisorApiErrors", "exp_alerts": [
                    _case("CladoSupervisorApiErrors", "30% of Clado API requests fail (a)",
                          severity="warning", instance="a"),
                ]},
                {"eval_time": "15m", "alertname": "CladoSupervisorApiKeyRejected", "exp_alerts": []},
            ],
        },
        {  # 3 jobs blind for lack of a count, for longer than the rule's 5 minutes; none forbidden.
            "interval": "1m",
            "input_series": [
                {"series": 'clado_supervisor_jobs_blind{reason="no_count",instance="a"}', "values": "3x10"},
                {"series": 'clado_supervisor_jobs_blind{reason="forbidden",instance="a"}', "values": "0x10"},
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "CladoSupervisorJobsBlind", "exp_alerts": []},  # pending (for: 5m)
                {"eval_time": "8m", "alertname": "CladoSupervisorJobsBlind", "exp_alerts": [
                    _case("CladoSupervisorJobsBlind", "3 job(s) blind (no_count): their spend cannot be read",
                          severity="warning", reason="no_count"),
                ]},
            ],
        },
        {  # a: drift from the third minute; b: none.
            "interval": "1m",
            "input_series": [
                {"series": 'clado_supervisor_api_drift{instance="a"}', "values": "0 0 1 1"},
                {"series": 'clado_supervisor_api_drift{instance="b"}', "values": "0 0 0 0"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "CladoSupervisorApiDrift", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "CladoSupervisorApiDrift", "exp_alerts": [
                    _case("CladoSupervisorApiDrift",
                          "The Clado API's status answers are unreadable for job after job (a)",
                          severity="critical", instance="a"),
                ]},
            ],
        },
        {  # hook a: one delivery waiting since t = 0 (the age grows); hook b: drained within a minute.
            "interval": "1m",
            "input_series": [
                {"series": 'clado_supervisor_outbox_oldest_pending_seconds{hook="a",instance="r1"}',
                 "values": "0+60x30"},
                {"series": 'clado_supervisor_outbox_oldest_pending_seconds{hook="a",instance="r2"}',
                 "values": "0+60x30"},
                {"series": 'clado_supervisor_outbox_oldest_pending_seconds{hook="b",instance="r1"}',
                 "values": "30 0 45 0 30 0 45 0 30 0 45 0 30 0 45 0 30 0 45 0 30 0 45 0 30"},
            ],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "CladoSupervisorWebhookBacklog", "exp_alerts": []},  # pending
                {"eval_time": "21m", "alertname": "CladoSupervisorWebhookBacklog", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "hook": "a"}, "exp_annotations": {
                        "summary": "Webhook deliveries to a are 21m 0s behind",
                        "description": rules()["CladoSupervisorWebhookBacklog"]["annotations"]["description"]}},
                ]},
            ],
        },
    ]  # fmt: skip
    covered = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert covered == ALERTS
    unit = tmp_path / "alerts_test.yaml"
    unit.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    result = run(tool, "test", "rules", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_real_scrape_passes_promtool_check_metrics(tmp_path: Path, fake_api: FakeApiProcess) -> None:
    tool = promtool()
    port = free_port()
    text = config_text(fake_api.base_url, "sqlite:///supervisor.db")
    (tmp_path / "supervisor.toml").write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'))
    job_id = fake_api.create_job(rate=1, limit=500)
    assert cli("track", job_id, cwd=tmp_path).returncode == 0
    daemon = DaemonProcess(tmp_path)
    try:

        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    body = response.read().decode()
            except OSError:
                return None
            # Once the job has been polled, the labelled API series are there too.
            return body if 'clado_supervisor_api_requests_total{endpoint="status"' in body else None

        exposition = wait_for(scrape, what="a scrape with the job's polls")
    finally:
        assert daemon.stop() == 0
    result = run(tool, "check", "metrics", stdin=exposition)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (result.stdout + result.stderr).strip()  # no lint finding either
